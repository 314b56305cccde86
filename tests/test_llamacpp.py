"""refq's GGUF exports run by llama.cpp's own tools (optional).

Skipped unless llama.cpp's llama-perplexity and llama-quantize are found
($LLAMA_CPP_DIR, a llama.cpp build's build/bin, then PATH); refq never needs
them. Independent truths: llama.cpp's own forward pass, tokenizer and
perplexity loop (its perplexity against `refq eval --protocol llama.cpp`), and
llama-quantize's Q4_0 blocks against gguf-py's port of ggml's
quantize_row_q4_0_ref.
"""
import json
import os

import numpy as np
import pytest

from refq.interop import llamacpp

BINS = llamacpp.find_binaries()
pytestmark = pytest.mark.skipif(
    BINS is None, reason="llama.cpp's llama-perplexity / llama-quantize not found: set "
    "LLAMA_CPP_DIR to the folder holding them (e.g. a llama.cpp build's build/bin)")

CTX = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny byte-BPE llama (test_export's), its F32 GGUF and an RTN w4 g32 sym -> Q4_0
    GGUF, and a text of ~10 windows of CTX tokens."""
    from refq.export import export_checkpoint
    from test_export import make_ckpt, write_byte_bpe_tokenizer
    from conftest import write_tiny_checkpoint
    d = tmp_path_factory.mktemp("llamacpp")
    model = str(d / "tiny")
    write_tiny_checkpoint(model, vocab=258, hidden=64, heads=4, kv_heads=2, ff=96, layers=2,
                          tokenizer=False, scale=0.1)
    from safetensors.numpy import load_file, save_file
    t = load_file(os.path.join(model, "model.safetensors"))
    t["model.embed_tokens.weight"] *= 0.2      # logits of std ~2 (the tied lm_head), not ~10
    save_file(t, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    write_byte_bpe_tokenizer(model)
    rtn = str(d / "rtn")
    make_ckpt(model, rtn, "rtn", bits=4, group_size=32, sym=True)
    export_checkpoint(model, "gguf", str(d / "f32"))
    export_checkpoint(rtn, "gguf", str(d / "q4"))
    rng = np.random.default_rng(0)
    words = ["the", "then", "he", "hat", "tea", "ate", "eat", "at"]
    text = str(d / "text.txt")
    with open(text, "w") as f:
        f.write(" ".join(rng.choice(words, 200)) + "\n")
    return {"model": model, "rtn": rtn, "f32": str(d / "f32" / "model.gguf"),
            "q4": str(d / "q4" / "model.gguf"), "text": text, "dir": d}


def refq_eval(model, text):
    from test_export import run_cli
    rc, out, err = run_cli("eval", "--model", model, "--text", text, "--ctx", str(CTX),
                           "--protocol", "llama.cpp", "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("which,tol", [("f32", 1e-4), ("q4", 1e-2)])
def test_llama_perplexity_equals_refq_eval(exported, which, tol):
    """The same windows and scored tokens, the same perplexity: F32 within 0.01 % (measured:
    2e-8; llama.cpp keeps K/V in float16 and prints 4 decimals), Q4_0 within 1 % (measured:
    0.15 %; llama.cpp rounds the activations to Q8_0 blocks for its Q4_0 dot products)."""
    ll = llamacpp.perplexity(BINS, exported[which], exported["text"], ctx=CTX, threads=1)
    rq = refq_eval(exported["model" if which == "f32" else "rtn"], exported["text"])
    assert ll["scored_tokens"] == rq["tokens"]
    assert ll["ppl"] == pytest.approx(rq["ppl"], rel=tol)


def test_llama_quantize_q4_0_is_ggml_reference_rounding(exported):
    """llama-quantize's Q4_0 of refq's F32 export is, block for block, gguf-py's port of
    ggml's quantize_row_q4_0_ref (d = the signed value of largest |w| / -8) of the same
    tensors; refq's symmetric RTN (step 2 max|w| / 15) is another grid."""
    import gguf
    out = str(exported["dir"] / "llama-q4_0.gguf")
    llamacpp.quantize(BINS, exported["f32"], out, "q4_0", threads=1)
    f32 = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(exported["f32"]).tensors}
    n = 0
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            want = gguf.quants.quantize(f32[t.name], gguf.GGMLQuantizationType.Q4_0)
            np.testing.assert_array_equal(np.asarray(t.data, np.uint8).reshape(want.shape), want,
                                          err_msg=t.name)
            n += 1
        else:       # --pure, embedding kept f32: only the 1-D norms and the embedding
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    assert n == 2 * 7
