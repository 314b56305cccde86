"""Shared test helpers: a tiny LLaMA-family checkpoint written from scratch.

`write_tiny_checkpoint(folder, ...)` writes config.json, safetensors file(s)
(sharded with model.safetensors.index.json when shards > 1) and a tiny
WordLevel tokenizer.json, and returns the float32 weights exactly as stored
(after rounding to the file's dtype), so a reference forward pass can use the
very same numbers.

bf16 files are written by hand (safetensors.numpy cannot hold bf16): the
format is 8 bytes little-endian header length, a JSON header, then the data.
That also makes the writer independent of the reader under test.
"""
import json
import os
import struct
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

EOS_ID = 1  # the tiny tokenizer's "<eos>"


# --------------------------------------------------------------------------- bf16
def f32_to_bf16_bits(a):
    """float32 -> bf16 bit patterns (uint16), round to nearest, ties to even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_f32(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- safetensors by hand
_ST_DTYPE = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
             np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
             np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
             np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
             np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def write_safetensors_by_hand(path, tensors, metadata=None):
    """tensors: name -> (dtype string, array of the stored bits). Returns the header."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        dt, arr = tensors[name]
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(np.shape(arr)),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    hbytes = json.dumps(header).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)           # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)
    return header


# --------------------------------------------------------------------------- tokenizer
def tiny_vocab(vocab):
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(2, vocab)]
    return {w: i for i, w in enumerate(words)}


def write_tiny_tokenizer(folder, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel(tiny_vocab(vocab), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))


def tiny_text(ids):
    """Text that the tiny tokenizer encodes to exactly ids (all ids >= 2)."""
    return " ".join(f"w{i}" for i in ids)


# --------------------------------------------------------------------------- checkpoint
def write_tiny_checkpoint(folder, *, model_type="llama", vocab=64, hidden=32, layers=2,
                          heads=4, kv_heads=2, ff=48, attention_bias=False, tie=True,
                          dtype="float32", shards=1, rope_scaling=None, head_dim=None,
                          rope_parameters_style=False, seed=0, rope_theta=10000.0,
                          rms_norm_eps=1e-5, tokenizer=True, scale=0.25):
    """Write a tiny random checkpoint; return {name: float32 array as stored}.

    attention_bias=None leaves the key out of config.json (qwen2 then implies
    q/k/v biases). rope_parameters_style writes the transformers 5.x form
    {"rope_parameters": {"rope_theta", "rope_type", ...scaling}}.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    hd = head_dim or hidden // heads
    has_bias = attention_bias if attention_bias is not None else model_type == "qwen2"

    def mat(*shape, s=scale):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, hidden, s=1.0),
         "model.norm.weight": (1 + mat(hidden, s=0.1))}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + mat(hidden, s=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + mat(hidden, s=0.1)
        w[p + "self_attn.q_proj.weight"] = mat(heads * hd, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_heads * hd, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_heads * hd, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * hd)
        w[p + "mlp.gate_proj.weight"] = mat(ff, hidden)
        w[p + "mlp.up_proj.weight"] = mat(ff, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, ff)
        if has_bias:
            w[p + "self_attn.q_proj.bias"] = mat(heads * hd, s=0.2)
            w[p + "self_attn.k_proj.bias"] = mat(kv_heads * hd, s=0.2)
            w[p + "self_attn.v_proj.bias"] = mat(kv_heads * hd, s=0.2)
    if not tie:
        w["lm_head.weight"] = mat(vocab, hidden, s=0.5)

    # round to the file's dtype; `stored` maps name -> (safetensors dtype, bits)
    stored = {}
    for n, a in w.items():
        if dtype == "float32":
            stored[n] = ("F32", a)
        elif dtype == "float16":
            stored[n] = ("F16", a.astype(np.float16))
            w[n] = stored[n][1].astype(np.float32)
        elif dtype == "bfloat16":
            stored[n] = ("BF16", f32_to_bf16_bits(a))
            w[n] = bf16_bits_to_f32(stored[n][1])
        else:
            raise ValueError(dtype)

    names = list(w)
    groups = [names[k::shards] for k in range(shards)]
    files = (["model.safetensors"] if shards == 1 else
             [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)])
    for fname, group in zip(files, groups):
        path = os.path.join(folder, fname)
        part = {n: stored[n] for n in group}
        if dtype == "bfloat16":
            write_safetensors_by_hand(path, part, metadata={"format": "pt"})
        else:
            from safetensors.numpy import save_file
            save_file({n: bits for n, (_, bits) in part.items()}, path,
                      metadata={"format": "pt"})
    if shards > 1:
        index = {"metadata": {"total_size": 0},
                 "weight_map": {n: fname for fname, g in zip(files, groups) for n in g}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)

    cfg = {"architectures": ["LlamaForCausalLM" if model_type == "llama" else "X"],
           "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": ff, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "rms_norm_eps": rms_norm_eps, "tie_word_embeddings": tie,
           "max_position_embeddings": 256, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID,
           "torch_dtype": dtype}
    if attention_bias is not None:
        cfg["attention_bias"] = attention_bias
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if rope_parameters_style:
        rp = {"rope_theta": rope_theta, "rope_type": "default"}
        if rope_scaling is not None:
            rp.update(rope_scaling)
        cfg["rope_parameters"] = rp
    else:
        cfg["rope_theta"] = rope_theta
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer:
        write_tiny_tokenizer(folder, vocab)
    return w


def write_tiny_workspace(d, texts, seed=0, **checkpoint_kw):
    """A tiny model in d/model (write_tiny_checkpoint(**checkpoint_kw)) and, for each
    (file name, n tokens) of texts, a text of n random in-vocabulary tokens in d/name:
    what a CLI test quantizes and evaluates."""
    write_tiny_checkpoint(str(d / "model"), **checkpoint_kw)
    rng = np.random.default_rng(seed)
    for name, n in texts:
        (d / name).write_text(tiny_text(rng.integers(2, 64, size=n)) + "\n")
    return d


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A factory: tiny_ckpt(**kw) -> (folder, weights)."""
    count = [0]

    def make(**kw):
        count[0] += 1
        folder = str(tmp_path / f"tiny{count[0]}")
        return folder, write_tiny_checkpoint(folder, **kw)
    return make


@pytest.fixture(scope="session")
def smollm2_path():
    """The real default model's HF folder (SmolLM2-135M-Instruct), fetched once."""
    from refq.fetch import ensure_default_model
    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def real_layers(smollm2_path):
    """(model, {layer: {linear group: H}}) for decoder layers 0 and 10 of SmolLM2.

    H = mean x xᵀ from 8 windows of 128 tokens of data/calib.txt (seed 0),
    layers 0..9 run dense.  `real_weight(real_layers, layer, name)` -> (W, H).
    Shared by every method's real-layer tests (captured once per session).
    """
    from llama_np import LINEAR_GROUPS, Tokenizer, load_model
    from refq.calibrate import calibration_windows, capture_hessians
    model, tok = load_model(smollm2_path), Tokenizer(smollm2_path)
    with open(os.path.join(REPO, "data", "calib.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read(60_000))
    windows = calibration_windows(ids, nsamples=8, seqlen=128, seed=0)
    pos = np.arange(128)
    hs = [model.embed(w) for w in windows]
    Hs = {}
    for i in range(11):
        if i in REAL_LAYERS:
            Hs[i] = capture_hessians(model.layers[i], hs, pos, list(LINEAR_GROUPS))
        if i < max(REAL_LAYERS):
            hs = [model.layers[i].forward(h, pos) for h in hs]
    return model, Hs


REAL_LAYERS = (0, 10)


def real_weight(real_layers, layer, name):
    """-> (W (out, in) float32, H (in, in) float64) of linear `name` (e.g. "mlp.up_proj")."""
    from llama_np import LINEAR_GROUPS
    model, Hs = real_layers
    group = next(g for g in LINEAR_GROUPS if name in g)
    return model.layers[layer].linears[name].dequantize(), Hs[layer][group]


# --------------------------------------------------------------------------- CLI errors
def assert_one_line_error(rc, out, err, *must_name):
    lines = err.splitlines()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for s in must_name:
        assert s in lines[0], (s, lines[0])
    assert out == "", out
    return lines[0]

