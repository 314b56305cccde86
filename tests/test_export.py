"""`refq export` (GPTQ / AQLM / GGUF) and reading the exported checkpoints back.

The exported files are read here by readers written from the published
layouts (FORMAT.md, "Interop"), not by refq.interop: GPTQ and AQLM by the
small numpy readers below (bit unpacking with np.unpackbits over the words'
little-endian bytes, unlike the exporter's shifts), GGUF by the gguf
library's own GGUFReader and gguf.quants.dequantize. Every round trip must
be bit-exact: refq -> export -> (their reader | refq's import) gives the
very dequantized weights refq had.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, tiny_text, write_tiny_checkpoint

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HEADS, KV_HEADS = 4, 2


# --------------------------------------------------------------------------- fixtures
def write_byte_bpe_tokenizer(folder):
    """A byte-level BPE tokenizer: 256 byte tokens and two merges ("Ġt", "he"): 258 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({"Ġt": 256, "he": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False}, f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama (hidden 64, ff 96: every width a multiple of 32), byte-BPE vocabulary."""
    folder = str(tmp_path_factory.mktemp("export") / "tiny")
    write_tiny_checkpoint(folder, vocab=258, hidden=64, heads=HEADS, kv_heads=KV_HEADS, ff=96,
                          layers=2, tokenizer=False)
    write_byte_bpe_tokenizer(folder)
    return folder


def make_ckpt(tiny, out, method, positive=False, **opts):
    """Quantize every linear of `tiny` with a random (fixed) Hessian; save a refq checkpoint.

    positive: layer 0's q_proj made non-negative (an asymmetric grid's zero is then 0)."""
    import refq
    from llama_np import load_model
    from refq.checkpoint import save_packed
    model = load_model(tiny)
    rng = np.random.default_rng(0)
    quantized = {}
    for i, layer in enumerate(model.layers):
        for n, lin in layer.linears.items():
            W = np.asarray(lin.weight, np.float32)
            if positive and i == 0 and n == "self_attn.q_proj":
                W = np.abs(W)
            X = rng.standard_normal((256, W.shape[1])) * rng.uniform(0.2, 2.0, W.shape[1])
            H = X.T @ X / len(X)
            quantized[f"model.layers.{i}.{n}"] = refq.quantize_weight(W, H, method, **opts)
    save_packed(out, tiny, model, quantized, {"method": method, "options": opts})
    return quantized


def make_additive_ckpt(tiny, out, M, B, g, seed=0):
    """A refq `additive` checkpoint with random codes / codebooks / scales (format test)."""
    from llama_np import load_model
    from refq.checkpoint import save_packed
    from refq.formats.additive import AdditiveWeight
    model = load_model(tiny)
    rng = np.random.default_rng(seed)
    quantized = {}
    for i, layer in enumerate(model.layers):
        for n, lin in layer.linears.items():
            out_f, in_f = lin.weight.shape
            codes = rng.integers(0, 2 ** B, size=(out_f, in_f // g, M))
            cb = rng.standard_normal((M, 2 ** B, g)) * 0.1
            quantized[f"model.layers.{i}.{n}"] = AdditiveWeight.from_arrays(
                codes, cb, rng.uniform(0.5, 2, out_f), B,
                options={"num_codebooks": M, "nbits_per_codebook": B, "in_group_size": g})
    save_packed(out, tiny, model, quantized, {"method": "aqlm", "options": {}})
    return quantized


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "refq.cli", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


# --------------------------------------------------------------------------- readers from the layouts
def words_to_codes(words, bits, count):
    """int32 words (rows, nwords) -> (rows, count) codes: each row's words are one
    little-endian LSB-first bitstream of `bits`-bit codes."""
    by = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)        # (rows, nwords*4)
    st = np.unpackbits(by, axis=1, bitorder="little")[:, :count * bits]
    return (st.reshape(len(words), count, bits).astype(np.int64) << np.arange(bits)).sum(-1)


def read_gptq(folder, name):
    """W (out, in) float32 of one linear of a GPTQ Hugging Face checkpoint."""
    from safetensors.numpy import load_file
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    t = load_file(os.path.join(folder, "model.safetensors"))
    b = qc["bits"]
    qweight, qzeros = t[name + ".qweight"], t[name + ".qzeros"]     # (in*b/32, out), (G, out*b/32)
    scales, g_idx = t[name + ".scales"], t[name + ".g_idx"]          # (G, out), (in,)
    n, out = qweight.shape[0] * 32 // b, qweight.shape[1]
    codes = words_to_codes(qweight.T, b, n)                          # (out, in): column j's stream
    zeros = words_to_codes(qzeros, b, out)                           # (G, out)
    if qc["checkpoint_format"] == "gptq":
        zeros = zeros + 1
    return (scales.astype(np.float32)[g_idx].T
            * (codes - zeros[g_idx].T).astype(np.float32))


def read_aqlm(folder, name):
    """W (out, in) float32 of one linear of an AQLM Hugging Face checkpoint."""
    from safetensors.numpy import load_file
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    t = load_file(os.path.join(folder, "model.safetensors"))
    B = qc["nbits_per_codebook"]
    codes = t[name + ".codes"].astype(np.int64) % 2 ** B              # (out/og, in/ig, M)
    cb = t[name + ".codebooks"].astype(np.float32)                    # (M, 2^B, og, ig)
    og, ig = cb.shape[2], cb.shape[3]
    acc = cb[0][codes[:, :, 0]]                                       # (out/og, in/ig, og, ig)
    for m in range(1, codes.shape[2]):
        acc = acc + cb[m][codes[:, :, m]]
    no, ni = codes.shape[:2]
    W = acc.transpose(0, 2, 1, 3).reshape(no * og, ni * ig)
    return t[name + ".scales"].astype(np.float32).reshape(-1)[np.arange(no * og) // og, None] * W


def read_gguf(path):
    """{HF linear name: (ggml type name, W (out, in) float32)} with gguf's own reader."""
    import gguf

    from llama_np.gguf_import import hf_name, unpermute
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        W = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            W = unpermute(W, HEADS)
        elif name.endswith("k_proj.weight"):
            W = unpermute(W, KV_HEADS)
        out[name[:-len(".weight")] if name.endswith("_proj.weight") else name] = (t.tensor_type.name, W)
    return r, out


# --------------------------------------------------------------------------- GPTQ
GPTQ_CASES = [
    ("rtn", dict(bits=4, group_size=32, sym=True)),
    ("gptq", dict(bits=3, group_size=32, act_order=True)),           # asym, act-order g_idx
    ("gptq", dict(bits=2, group_size=None, sym=False)),             # per-channel
    ("gptq", dict(bits=8, group_size=64, act_order=True, static_groups=True, sym=True)),
    ("gptq", dict(bits=4, group_size=48, sym=False)),               # ragged last group of down_proj
]


@pytest.mark.parametrize("method,opts", GPTQ_CASES)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_round_trip_exact(tiny, tmp_path, method, opts, fmt):
    from refq.checkpoint import load_packed
    from refq.errors import RefqError
    from refq.export import export_checkpoint
    src = str(tmp_path / "refq")
    qws = make_ckpt(tiny, src, method, **opts)
    out = str(tmp_path / "gptq")
    wraps = fmt == "gptq" and any(not q.sym and (q.zeros() == 0).any() for q in qws.values())
    if wraps:           # v1 cannot store a zero of 0: refused, nothing written
        with pytest.raises(RefqError, match="gptq_v2"):
            export_checkpoint(src, "gptq", out, checkpoint_format=fmt)
        assert not os.path.exists(out) and os.listdir(tmp_path) == ["refq"]
        return
    export_checkpoint(src, "gptq", out, checkpoint_format=fmt)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "quantize_config.json",
                                       "tokenizer.json", "tokenizer_config.json"]
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc == json.load(open(os.path.join(out, "quantize_config.json")))
    assert (qc["quant_method"], qc["bits"], qc["sym"], qc["checkpoint_format"]) == \
        ("gptq", opts["bits"], opts.get("sym", False), fmt)
    assert qc["group_size"] == (opts["group_size"] or -1)
    assert qc["desc_act"] == (opts.get("act_order", False) and not opts.get("static_groups", False))
    _, _, _, imported = load_packed(out)
    for name, q in qws.items():
        ref = q.dequantize()
        np.testing.assert_array_equal(read_gptq(out, name), ref, err_msg=name)
        np.testing.assert_array_equal(imported[name].dequantize(), ref, err_msg=name)


def test_gptq_v1_refuses_zero_of_zero(tiny, tmp_path):
    """A non-negative row has an asymmetric zero of 0: v1 (zeros minus one) would wrap it,
    so it is refused with nothing written; v2 stores it, exactly."""
    from refq.errors import RefqError
    from refq.export import export_checkpoint
    src = str(tmp_path / "r")
    qws = make_ckpt(tiny, src, "gptq", positive=True, bits=4, group_size=32, sym=False)
    assert (qws["model.layers.0.self_attn.q_proj"].zeros() == 0).any()
    with pytest.raises(RefqError, match="gptq_v2"):
        export_checkpoint(src, "gptq", str(tmp_path / "v1"))
    assert os.listdir(tmp_path) == ["r"]
    export_checkpoint(src, "gptq", str(tmp_path / "v2"), checkpoint_format="gptq_v2")
    for name, q in qws.items():
        np.testing.assert_array_equal(read_gptq(str(tmp_path / "v2"), name), q.dequantize())


def test_gptq_refusals(tiny, tmp_path):
    from refq.errors import RefqError
    from refq.export import export_checkpoint
    src = str(tmp_path / "r5")
    make_ckpt(tiny, src, "rtn", bits=5, group_size=32, sym=True)
    with pytest.raises(RefqError, match="5-bit"):
        export_checkpoint(src, "gptq", str(tmp_path / "o"))
    src2 = str(tmp_path / "claq")
    make_ckpt(tiny, src2, "claq", bits=3)
    with pytest.raises(RefqError, match="no GPTQ equivalent"):
        export_checkpoint(src2, "gptq", str(tmp_path / "o"))
    with pytest.raises(RefqError, match="no AQLM equivalent"):
        export_checkpoint(src2, "aqlm", str(tmp_path / "o"))
    assert sorted(os.listdir(tmp_path)) == ["claq", "r5"]


def test_gptq_width_not_multiple_of_32(tmp_path):
    from refq.errors import RefqError
    from refq.export import export_checkpoint
    folder = str(tmp_path / "odd")
    write_tiny_checkpoint(folder, hidden=32, heads=4, kv_heads=2, ff=48)   # down_proj in = 48
    make_ckpt(folder, str(tmp_path / "r"), "rtn", bits=4, group_size=16, sym=True)
    with pytest.raises(RefqError, match="multiples of 32"):
        export_checkpoint(str(tmp_path / "r"), "gptq", str(tmp_path / "o"))


# --------------------------------------------------------------------------- AQLM
@pytest.mark.parametrize("M,B,g", [(2, 8, 8), (1, 12, 16), (3, 4, 4)])
def test_aqlm_round_trip_exact(tiny, tmp_path, M, B, g):
    from safetensors.numpy import load_file

    from refq.checkpoint import load_packed
    from refq.export import export_checkpoint
    src = str(tmp_path / "refq")
    qws = make_additive_ckpt(tiny, src, M, B, g)
    out = str(tmp_path / "aqlm")
    export_checkpoint(src, "aqlm", out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc == {"quant_method": "aqlm", "in_group_size": g, "out_group_size": 1,
                  "num_codebooks": M, "nbits_per_codebook": B,
                  "linear_weights_not_to_quantize": ["model.embed_tokens.weight"]}
    t = load_file(os.path.join(out, "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    assert t[name + ".codes"].dtype == (np.int8 if B <= 8 else np.int16)
    assert t[name + ".codes"].min() < 0 or B < 8          # high codes stored negative
    _, _, _, imported = load_packed(out)
    for name, q in qws.items():
        ref = q.dequantize()
        np.testing.assert_array_equal(read_aqlm(out, name), ref, err_msg=name)
        np.testing.assert_array_equal(imported[name].dequantize(), ref, err_msg=name)


# --------------------------------------------------------------------------- GGUF
GGUF_CASES = [   # (method, options, expected ggml type of the linears, exact?)
    ("rtn", dict(bits=4, group_size=32, sym=True), "Q4_0", True),
    ("gptq", dict(bits=4, group_size=64, sym=True), "Q4_0", True),
    ("gptq", dict(bits=3, group_size=None, sym=False), "Q4_0", True),   # q = c - z in [-7, 7]
    ("rtn", dict(bits=8, group_size=32, sym=True), "Q8_0", True),
    ("gptq", dict(bits=6, group_size=32, sym=False), "Q8_0", True),
    ("gptq", dict(bits=4, group_size=32, sym=False), "Q4_1", False),
    ("gptq", dict(bits=4, group_size=16, sym=True), "F16", False),      # groups straddle blocks
]


@pytest.mark.parametrize("method,opts,kind,exact", GGUF_CASES)
def test_gguf_read_by_gguf_library(tiny, tmp_path, method, opts, kind, exact):
    from refq.export import export_checkpoint
    src = str(tmp_path / "refq")
    qws = make_ckpt(tiny, src, method, **opts)
    out = str(tmp_path / "gguf")
    rep = export_checkpoint(src, "gguf", out)
    assert os.listdir(out) == ["model.gguf"]
    assert {t["type"] for t in rep["tensors"]} == {kind}
    r, tensors = read_gguf(os.path.join(out, "model.gguf"))
    for name, q in qws.items():
        got_kind, W = tensors[name]
        ref = q.dequantize()
        assert got_kind == kind
        if exact:
            np.testing.assert_array_equal(W, ref, err_msg=name)
        elif kind == "Q4_1":     # d*u + fp16(m): only the minimum's fp16 rounding differs
            err = np.abs(W - ref).max()
            assert 0 < err <= np.abs(ref).max() * 2 ** -10, (name, err)
        else:
            np.testing.assert_array_equal(W, ref.astype(np.float16).astype(np.float32))
    # the same export with --exact is bit-exact everywhere
    rep = export_checkpoint(src, "gguf", str(tmp_path / "exact"), exact=True)
    assert all(t["exact"] for t in rep["tensors"])
    _, tensors = read_gguf(os.path.join(str(tmp_path / "exact"), "model.gguf"))
    for name, q in qws.items():
        np.testing.assert_array_equal(tensors[name][1], q.dequantize(), err_msg=name)


def test_gguf_metadata_and_unquantized_tensors(tiny, tmp_path):
    """What llama.cpp reads: hyper-parameters, the vocabulary, F32 embedding and norms."""
    from llama_np import Checkpoint
    from llama_np.gguf_import import gguf_config
    from refq.export import export_checkpoint
    src = str(tmp_path / "refq")
    make_ckpt(tiny, src, "rtn", bits=4, group_size=32, sym=True)
    export_checkpoint(src, "gguf", str(tmp_path / "g"))
    r, tensors = read_gguf(str(tmp_path / "g" / "model.gguf"))
    cfg = gguf_config(r, "x")
    hf = json.load(open(os.path.join(tiny, "config.json")))
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
              "tie_word_embeddings", "vocab_size", "bos_token_id", "eos_token_id"):
        assert cfg[k] == hf[k], k
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    # GPT-2's pre-tokenizer is "gpt-2" to llama.cpp (src/llama-vocab.cpp; "gpt2" fails to load)
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 258
    assert r.fields["tokenizer.ggml.merges"].contents() == ["Ġ t", "h e"]
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is False
    ck = Checkpoint(tiny)
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.1.input_layernorm.weight"):
        kind, W = tensors[name]
        assert kind == "F32"
        np.testing.assert_array_equal(W, ck.get(name))


def test_gguf_refuses_act_order_permutation(tiny, tmp_path):
    from refq.errors import RefqError
    from refq.export import export_checkpoint
    src = str(tmp_path / "refq")
    make_ckpt(tiny, src, "gptq", bits=4, group_size=32, act_order=True)
    with pytest.raises(RefqError, match="permutation"):
        export_checkpoint(src, "gguf", str(tmp_path / "g"))
    assert os.listdir(tmp_path) == ["refq"]


def test_gguf_from_dense_folder_is_f32(tiny, tmp_path):
    from llama_np import Checkpoint
    from refq.export import export_checkpoint
    export_checkpoint(tiny, "gguf", str(tmp_path / "g"))
    _, tensors = read_gguf(str(tmp_path / "g" / "model.gguf"))
    ck = Checkpoint(tiny)
    for n in LINEARS:
        name = "model.layers.1." + n
        assert tensors[name][0] == "F32"
        np.testing.assert_array_equal(tensors[name][1], ck.get(name + ".weight"))


# --------------------------------------------------------------------------- CLI
def test_cli_export_errors_and_imported_eval(tiny, tmp_path):
    src = str(tmp_path / "refq")
    make_ckpt(tiny, src, "rtn", bits=4, group_size=32, sym=True)
    rc, out, err = run_cli("export", src, "--to", "onnx", "--out", str(tmp_path / "x"))
    assert_one_line_error(rc, out, err, "--to onnx")
    os.makedirs(tmp_path / "exists")
    rc, out, err = run_cli("export", src, "--to", "gptq", "--out", str(tmp_path / "exists"))
    assert_one_line_error(rc, out, err, "already exists")
    rc, out, err = run_cli("export", str(tmp_path / "nope"), "--to", "gptq", "--out",
                           str(tmp_path / "y"))
    assert_one_line_error(rc, out, err, "nope")
    assert sorted(os.listdir(tmp_path)) == ["exists", "refq"]
    g = str(tmp_path / "gptq")
    rc, out, err = run_cli("export", src, "--to", "gptq", "--out", g, "--json")
    assert rc == 0, err
    assert json.loads(out)["files"]["model.safetensors"] > 0
    # refq eval / info on the exported (imported) checkpoint: the very same perplexity
    text = str(tmp_path / "t.txt")
    with open(text, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog; 0123456789 " * 4)
    res = {}
    for m in (src, g):
        rc, out, err = run_cli("eval", "--model", m, "--text", text, "--ctx", "64", "--json")
        assert rc == 0, err
        res[m] = json.loads(out)
    assert res[src]["ppl"] == res[g]["ppl"] and res[src]["tokens"] == res[g]["tokens"]
    rc, out, err = run_cli("info", g, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["quantized_linears"] == 14 and info["method"].startswith("gptq")


# --------------------------------------------------------------------------- import of foreign checkpoints
def codes_to_words(codes, bits):
    """(rows, count) codes -> (rows, count*bits/32) int32, each row one little-endian
    LSB-first bitstream (written with np.packbits, independently of refq.interop)."""
    st = ((codes[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(len(codes), -1)
    return np.packbits(st, axis=1, bitorder="little").view("<i4")


def foreign_model(tmp_path, make_fields, qc):
    """A Hugging Face folder as another tool writes it: fp16 dense tensors, quantized
    linears as make_fields(name, out, in) -> {field: array}; config's quantization_config."""
    from safetensors.numpy import load_file, save_file
    folder = str(tmp_path / "foreign")
    write_tiny_checkpoint(folder, vocab=256, hidden=64, heads=HEADS, kv_heads=KV_HEADS, ff=96,
                          layers=2, dtype="float16")
    t = load_file(os.path.join(folder, "model.safetensors"))
    out = {}
    for name, a in t.items():
        if name.endswith("_proj.weight"):
            out.update(make_fields(name[:-len(".weight")], *a.shape))
        else:
            out[name] = a
    save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["quantization_config"] = qc
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    return folder


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_import_foreign_gptq_act_order(tmp_path, fmt):
    """A GPTQ checkpoint built here from the layout (3-bit, groups of 32, act-order g_idx,
    asymmetric zeros): refq's import gives exactly what the layout's reader gives."""
    from refq.checkpoint import load_packed
    rng = np.random.default_rng(1)
    b, g = 3, 32

    def fields(name, out, n):
        G = n // g
        codes = rng.integers(0, 2 ** b, (n, out))                       # (in, out)
        zeros = rng.integers(1, 2 ** b, (G, out))                       # >= 1: v1-safe
        g_idx = rng.permutation(np.repeat(np.arange(G), g)).astype(np.int32)
        return {name + ".qweight": codes_to_words(codes.T, b).T.copy(),
                name + ".qzeros": codes_to_words(zeros - (fmt == "gptq"), b),
                name + ".scales": rng.uniform(0.01, 0.1, (G, out)).astype(np.float16),
                name + ".g_idx": g_idx}

    folder = foreign_model(tmp_path, fields, {
        "quant_method": "gptq", "bits": b, "group_size": g, "desc_act": True, "sym": False,
        "checkpoint_format": fmt})
    _, _, _, qws = load_packed(folder)
    assert len(qws) == 14
    for name, q in qws.items():
        np.testing.assert_array_equal(q.dequantize(), read_gptq(folder, name), err_msg=name)
        assert q.perm is not None
    rc, out, err = run_cli("generate", "--model", folder, "--prompt", "ab", "--max-new-tokens", "3")
    assert rc == 0, err


def test_import_foreign_aqlm_1x16(tmp_path):
    """An AQLM 1x16 checkpoint built here (int16 codes, negative for codes >= 2^15)."""
    from refq.checkpoint import load_packed
    rng = np.random.default_rng(2)
    B, ig = 16, 8

    def fields(name, out, n):
        codes = rng.integers(0, 2 ** B, (out, n // ig, 1))
        return {name + ".codes": np.where(codes >= 2 ** 15, codes - 2 ** 16, codes).astype(np.int16),
                name + ".codebooks": (rng.standard_normal((1, 2 ** B, 1, ig)) * 0.1).astype(np.float16),
                name + ".scales": rng.uniform(0.5, 2, (out, 1, 1, 1)).astype(np.float16)}

    folder = foreign_model(tmp_path, fields, {
        "quant_method": "aqlm", "in_group_size": ig, "out_group_size": 1, "num_codebooks": 1,
        "nbits_per_codebook": B, "linear_weights_not_to_quantize": ["model.embed_tokens.weight"]})
    _, _, _, qws = load_packed(folder)
    for name, q in qws.items():
        np.testing.assert_array_equal(q.dequantize(), read_aqlm(folder, name), err_msg=name)
    rc, out, err = run_cli("info", folder, "--json")
    assert rc == 0, err
    assert json.loads(out)["quantized_linears"] == 14


def test_import_foreign_refuses_bad_tensors(tmp_path):
    rng = np.random.default_rng(3)

    def fields(name, out, n):
        return {name + ".qweight": rng.integers(0, 9, (n * 4 // 32, out)).astype(np.int32),
                name + ".qzeros": np.zeros((1, out * 4 // 32), np.int32),
                name + ".scales": np.ones((1, out), np.float32)}               # not float16

    folder = foreign_model(tmp_path, fields, {"quant_method": "gptq", "bits": 4,
                                                    "group_size": -1, "sym": True})
    text = str(tmp_path / "t.txt")
    open(text, "w").write("abc " * 50)
    rc, out, err = run_cli("eval", "--model", folder, "--text", text, "--json")
    assert_one_line_error(rc, out, err, "q_proj", "float16")


# --------------------------------------------------------------------------- SmolLM2
@pytest.mark.parametrize("name", ["self_attn.k_proj", "mlp.down_proj"])
def test_smollm2_layers_exact_through_gptq_and_gguf(smollm2_path, name):
    """Real shapes (k_proj 192x576, down_proj 576x1536), GPTQ w4 g32 sym with a real H
    of layer 0: GPTQ layout (v1) read back by the layout reader and by refq's import,
    and Q4_0 block bytes dequantized by gguf.quants, all equal refq's weights bit for bit.
    (The whole model is exported and checked in benchmarks/bench_export.py.)"""
    import gguf

    from llama_np import load_model
    from refq.api import quantize_weight
    from refq.interop import gguf_export, gptq
    model = load_model(smollm2_path)
    W = np.asarray(model.layers[0].linears[name].weight, np.float32)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, W.shape[1])).astype(np.float32)
    q = quantize_weight(W, X.T.astype(np.float64) @ X / 512, "gptq", bits=4, group_size=32, sym=True)
    ref = q.dequantize()
    fields = gptq.export_layer("L", q, "gptq")
    words = fields["L.qweight"]
    codes = words_to_codes(words.T, 4, W.shape[1])
    zeros = words_to_codes(fields["L.qzeros"], 4, W.shape[0]) + 1
    g_idx = fields["L.g_idx"]
    W_gptq = fields["L.scales"].astype(np.float32)[g_idx].T * (codes - zeros[g_idx].T).astype(np.float32)
    np.testing.assert_array_equal(W_gptq, ref)
    imported = gptq.import_layer("L", lambda k, optional=False: fields.get(k),
                                 {"bits": 4, "group_size": 32}, W.shape)
    np.testing.assert_array_equal(imported.dequantize(), ref)
    kind, data, note = gguf_export.map_linear("L", q)
    assert (kind, note) == ("Q4_0", None)
    W_gguf = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(W_gguf, ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_is_one_bitstream_of_words(bits):
    """pack_int32 against Python's big integers: a column's codes as one number
    sum(code_i << (i*bits)), cut into 32-bit words, lowest first; and back."""
    from refq.interop.gptq import pack_int32, unpack_int32
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, (64, 3))                        # (in, out)
    words = pack_int32(codes, bits, axis=0)                            # (64*bits/32, 3)
    assert words.dtype == np.int32 and words.shape == (64 * bits // 32, 3)
    for j in range(3):
        big = sum(int(c) << (i * bits) for i, c in enumerate(codes[:, j]))
        want = [(big >> (32 * k)) & 0xFFFFFFFF for k in range(words.shape[0])]
        assert [int(w) & 0xFFFFFFFF for w in words[:, j]] == want
    np.testing.assert_array_equal(unpack_int32(words, bits, axis=0), codes)
    np.testing.assert_array_equal(unpack_int32(pack_int32(codes.T, bits, 1), bits, 1), codes.T)


def test_gguf_back_through_gguf_import(tiny, tmp_path):
    """The exported GGUF converted back by llama_np.gguf_import (the converter that reads
    llama.cpp's own SmolLM2 GGUF): same weights bit for bit, same config, same tokens."""
    from llama_np import Checkpoint, Tokenizer
    from llama_np.gguf_import import convert_gguf
    from refq.export import export_checkpoint
    src = str(tmp_path / "refq")
    qws = make_ckpt(tiny, src, "rtn", bits=4, group_size=32, sym=True)
    export_checkpoint(src, "gguf", str(tmp_path / "g"))
    back = convert_gguf(str(tmp_path / "g" / "model.gguf"), str(tmp_path / "hf"), progress=False)
    ck, orig = Checkpoint(back), Checkpoint(tiny)
    for name, q in qws.items():
        np.testing.assert_array_equal(ck.get(name + ".weight"), q.dequantize(), err_msg=name)
    for name in orig.names():
        if not name.endswith("_proj.weight"):
            np.testing.assert_array_equal(ck.get(name), orig.get(name), err_msg=name)
    text = "Hello, the world! 12345 tokens\n\tand   spaces"
    assert Tokenizer(back).encode(text) == Tokenizer(tiny).encode(text)
    cfg_back = json.load(open(os.path.join(back, "config.json")))
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    for k in ("hidden_size", "num_key_value_heads", "rope_theta", "rms_norm_eps", "vocab_size"):
        assert cfg_back[k] == cfg[k], k


def test_info_on_foreign_gptq_counts_what_is_stored(tmp_path):
    """`refq info` on a GPTQ checkpoint of another tool: the total and its breakdown are
    the stored tensors' bits, summed here from the safetensors file and in closed form
    (4-bit codes: 4 bits; fp16 scales per group of 32: 16/32; zeros: 4/32; g_idx: 32/out)."""
    from safetensors.numpy import load_file
    rng = np.random.default_rng(5)
    b, g = 4, 32

    def fields(name, out, n):
        G = n // g
        return {name + ".qweight": codes_to_words(rng.integers(0, 16, (out, n)), b).T.copy(),
                name + ".qzeros": codes_to_words(np.full((G, out), 7), b),
                name + ".scales": rng.uniform(0.01, 0.1, (G, out)).astype(np.float16),
                name + ".g_idx": (np.arange(n) // g).astype(np.int32)}

    folder = foreign_model(tmp_path, fields, {
        "quant_method": "gptq", "bits": b, "group_size": g, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"})
    rc, out, err = run_cli("info", folder, "--json")
    assert rc == 0, err
    info = json.loads(out)
    t = load_file(os.path.join(folder, "model.safetensors"))
    shapes = {k[:-len(".g_idx")]: (t[k[:-len(".g_idx")] + ".scales"].shape[1], len(t[k]))
              for k in t if k.endswith(".g_idx")}                     # name -> (out, in)
    n = sum(o * i for o, i in shapes.values())
    assert info["quantized_linears"] == len(shapes) == 14 and info["quantized_weights"] == n
    stored = {kind: 8 * sum(a.nbytes for k, a in t.items() if k.endswith("." + kind)) / n
              for kind in ("qweight", "qzeros", "scales", "g_idx")}
    assert info["bits_breakdown"] == pytest.approx(stored, rel=1e-12)
    assert info["bits_per_weight"] == pytest.approx(sum(stored.values()), rel=1e-12)
    assert sum(info["bits_breakdown"].values()) == pytest.approx(info["bits_per_weight"], rel=1e-12)
    g_idx_bits = sum(32 * i for o, i in shapes.values()) / n
    assert stored == pytest.approx({"qweight": b, "qzeros": b / g, "scales": 16 / g,
                                    "g_idx": g_idx_bits}, rel=1e-12)
    rc, text, err = run_cli("info", folder)
    assert rc == 0 and "GPTQ checkpoint of another tool" in text.splitlines()[0], (text, err)
