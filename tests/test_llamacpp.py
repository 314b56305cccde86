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
needs_llamacpp = pytest.mark.skipif(
    BINS is None, reason="llama.cpp's llama-perplexity / llama-quantize not found: set "
    "LLAMA_CPP_DIR to the folder holding them (e.g. a llama.cpp build's build/bin)")

CTX = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny byte-BPE llama (test_export's), its F32 GGUF, RTN w4 / w8 g32 sym checkpoints
    exported to Q4_0 / Q8_0, and a text of ~10 windows of CTX tokens."""
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
    make_ckpt(model, str(d / "rtn4"), "rtn", bits=4, group_size=32, sym=True)
    make_ckpt(model, str(d / "rtn8"), "rtn", bits=8, group_size=32, sym=True)
    export_checkpoint(model, "gguf", str(d / "f32"))
    export_checkpoint(str(d / "rtn4"), "gguf", str(d / "q4"))
    export_checkpoint(str(d / "rtn8"), "gguf", str(d / "q8"))
    rng = np.random.default_rng(0)
    words = ["the", "then", "he", "hat", "tea", "ate", "eat", "at"]
    text = str(d / "text.txt")
    with open(text, "w") as f:
        f.write(" ".join(rng.choice(words, 200)) + "\n")
    return {"model": model, "f32": str(d / "f32" / "model.gguf"),
            "q4": str(d / "q4" / "model.gguf"), "q8": str(d / "q8" / "model.gguf"),
            "refq": {"f32": model, "q4": str(d / "rtn4"), "q8": str(d / "rtn8")},
            "text": text, "dir": d}


def refq_eval(model, text):
    from test_export import run_cli
    rc, out, err = run_cli("eval", "--model", model, "--text", text, "--ctx", str(CTX),
                           "--protocol", "llama.cpp", "--json")
    assert rc == 0, err
    return json.loads(out)


@needs_llamacpp
@pytest.mark.parametrize("which,tol", [("f32", 1e-4), ("q4", 1e-2), ("q8", 1e-2)])
def test_llama_perplexity_equals_refq_eval(exported, which, tol):
    """The same windows and scored tokens, the same perplexity: F32 within 0.01 % (measured:
    2e-8; llama.cpp keeps K/V in float16 and prints 4 decimals), Q4_0 / Q8_0 (refq's RTN
    w4 / w8 g32 sym, exported exactly) within 1 % (measured: 0.15 % for Q4_0; llama.cpp
    rounds the activations to Q8_0 blocks for its quantized dot products)."""
    ll = llamacpp.perplexity(BINS, exported[which], exported["text"], ctx=CTX, threads=1)
    rq = refq_eval(exported["refq"][which], exported["text"])
    assert ll["scored_tokens"] == rq["tokens"]
    assert ll["ppl"] == pytest.approx(rq["ppl"], rel=tol)


@needs_llamacpp
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


# --------------------------------------------------------------------------- without llama.cpp
def fake_tools(folder, perplexity_output, rc=0):
    """A folder with stand-in llama-perplexity / llama-quantize scripts (shell)."""
    os.makedirs(folder, exist_ok=True)
    for tool, body in (("llama-perplexity", f"cat <<'EOF' >&2\n{perplexity_output}\nEOF\nexit {rc}"),
                       ("llama-quantize", "exit 0")):
        path = os.path.join(folder, tool)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body + "\n")
        os.chmod(path, 0o755)
    return str(folder)


HEAD = "I perplexity: calculating perplexity over 3 chunks, n_ctx=512, batch_size=512, n_seq=1"


def test_perplexity_is_read_from_the_tool_output(tmp_path, monkeypatch):
    """The numbers come from what the tool prints: the final estimate when present, else
    the running value after the last chunk (llama.cpp's log can lose its last lines),
    else the run is repeated and then refused in one line; a failing tool names itself."""
    from refq.errors import RefqError
    lines = f"{HEAD}\n[1]40.5000,[2]38.2500,[3]37.1250,\nI Final estimate: PPL = 37.1250 +/- 1.25000"
    monkeypatch.setenv(llamacpp.ENV, fake_tools(tmp_path / "a", lines))
    bins = llamacpp.find_binaries()
    assert bins["llama-perplexity"] == str(tmp_path / "a" / "llama-perplexity")
    r = llamacpp.perplexity(bins, "m.gguf", "t.txt", ctx=512)
    assert (r["ppl"], r["ppl_err"], r["chunks"], r["scored_tokens"]) == (37.125, 1.25, 3, 3 * 255)
    lost = f"{HEAD}\n[1]40.5000,[2]38.2500,[3]37.1250,"
    r = llamacpp.perplexity({"llama-perplexity": fake_tools(tmp_path / "b", lost) + "/llama-perplexity"},
                            "m.gguf", "t.txt")
    assert (r["ppl"], r["ppl_err"]) == (37.125, None) and "chunk 3" in r["ppl_from"]
    for out, rc, msg in ((f"{HEAD}\n[1]40.5000,[2]38.2500,", 0, "3 runs"),
                         ("E unable to load model", 1, "exited with 1: E unable to load model")):
        tool = fake_tools(tmp_path / f"c{rc}", out, rc) + "/llama-perplexity"
        with pytest.raises(RefqError, match=msg) as e:
            llamacpp.perplexity({"llama-perplexity": tool}, "m.gguf", "t.txt")
        assert "\n" not in str(e.value)


def test_find_binaries_none_without_them(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert llamacpp.find_binaries() is None
