"""Write a refq checkpoint (or a dense Hugging Face folder) as one GGUF file for llama.cpp.

Each quantized linear is mapped to a ggml block type when the mapping is
exact (FORMAT.md, "Interop: GGUF", has the block layouts and the sources).
A ggml block covers 32 consecutive inputs of one output row with one fp16
scale d, so a refq `uniform` layer whose groups are whole blocks
(group_size a multiple of 32, or per-channel, and in % 32 == 0), stored in
original column order (no act-order `perm`), becomes:

    W = s * (c - z)  with  q = c - z  (an integer, per weight)

    Q4_0  (18 bytes / 32 weights)  W = d * (u - 8),  u in [0, 16)
          exact when every q is in [-8, 7]:   d = s, u = q + 8
          (symmetric 2-, 3-, 4-bit codes; asymmetric 2- and 3-bit codes)
    Q8_0  (34 bytes / 32 weights)  W = d * q,  q int8
          exact when every q is in [-128, 127]: d = s
          (symmetric 5..8-bit codes; asymmetric 4..7-bit codes)
    Q4_1  (20 bytes / 32 weights)  W = d * u + m,  u in [0, 16)
          asymmetric 4-bit codes: d = s, u = c, m = fp16(-s * z): NOT exact,
          the minimum -s*z is rounded to float16 (the report gives the largest
          error); with exact=True Q8_0 is used instead

Anything else (other refq formats, groups that straddle blocks, act-order
without static groups is refused) is dequantized and stored as F16 with a
warning (F32 with exact=True: refq's dequantized weights are float32).
Embeddings, norms and an untied lm_head are stored F32, as refq holds them.

llama.cpp's converter permutes the rows of q_proj and k_proj per head (its
RoPE pairs adjacent dimensions, Hugging Face's pairs the two halves); the
same row permutation is applied here to the block rows (a permutation of
output rows keeps every block whole). llama_np/gguf_import.py undoes it.
"""
import json
import os

import numpy as np

from refq.errors import RefqError

BLOCK = 32


def permute_rows(n_rows, n_head):
    """Row order llama.cpp stores q/k in: gguf row r is HF row permute_rows(..)[r].

    HF rows (head h, half j, i) -> gguf rows (head h, i, half j), as llama.cpp's
    convert_hf_to_gguf.py permute(): reshape(n_head, 2, hd/2).swapaxes(1, 2).
    """
    hd = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(n_rows)


def _fp16_bytes(x):                                    # (..) -> (.., 2) uint8
    return np.ascontiguousarray(np.asarray(x, np.float16)).view(np.uint8).reshape(*np.shape(x), 2)


def _nibbles(u):
    """u (out, nblk, 32) in [0, 16) -> (out, nblk, 16): byte j = u[j] | u[j+16] << 4."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def blocks_q4_0(d, q):
    """d (out, nblk) fp16 scales, q (out, nblk, 32) ints in [-8, 7] -> (out, nblk*18) uint8."""
    out, nblk = d.shape
    b = np.concatenate([_fp16_bytes(d), _nibbles((q + 8).astype(np.uint8))], axis=-1)
    return b.reshape(out, nblk * 18)


def blocks_q4_1(d, m, u):
    """d, m (out, nblk) fp16; u (out, nblk, 32) in [0, 16) -> (out, nblk*20) uint8."""
    out, nblk = d.shape
    b = np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(u.astype(np.uint8))], axis=-1)
    return b.reshape(out, nblk * 20)


def blocks_q8_0(d, q):
    """d (out, nblk) fp16, q (out, nblk, 32) ints in [-128, 127] -> (out, nblk*34) uint8."""
    out, nblk = d.shape
    b = np.concatenate([_fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=-1)
    return b.reshape(out, nblk * 34)


def map_linear(name, q, exact=False):
    """A refq QuantizedWeight (or dense (out, in) array) -> (ggml type name, data, note).

    data: uint8 block bytes (out, row bytes) for Q4_0/Q4_1/Q8_0, else a float
    array (out, in). note: None when exact, else a short reason.
    """
    from refq.formats.uniform import UniformWeight
    if isinstance(q, np.ndarray):
        return "F32", np.ascontiguousarray(q, np.float32), None
    out, n = q.shape
    if isinstance(q, UniformWeight):
        if q.perm is not None:
            raise RefqError(f"{name}: act-order without static groups stores a column "
                            "permutation, which GGUF cannot express (quantize with "
                            "--static-groups, or export --to gptq)")
        g = q.group_size or n
        if n % BLOCK == 0 and g % BLOCK == 0:
            nblk = n // BLOCK
            blk_group = (np.arange(nblk) * BLOCK) // g                       # (nblk,)
            s = q.scales[:, blk_group]                                        # (out, nblk) fp16
            z = q.zeros().astype(np.int64)[:, blk_group]                      # (out, nblk)
            c = q.codes().astype(np.int64).reshape(out, nblk, BLOCK)          # (out, nblk, 32)
            d = c - z[:, :, None]                                             # W = s * d
            if d.min() >= -8 and d.max() <= 7:
                return "Q4_0", blocks_q4_0(s, d), None
            if q.bits == 4 and not exact:
                m = (-(s.astype(np.float64) * z)).astype(np.float16)           # rounded minimum
                return "Q4_1", blocks_q4_1(s, m, c), "the minimum -scale*zero rounded to float16"
            if d.min() >= -128 and d.max() <= 127:
                return "Q8_0", blocks_q8_0(s, d), None
            why = "codes minus zeros do not fit int8"
        else:
            why = f"groups of {g} inputs are not whole 32-weight blocks"
    else:
        why = f"format {q.FORMAT!r} has no ggml block type"
    W = q.dequantize()
    if exact:
        return "F32", W, None           # refq's float32 dequantized weights, as they are
    return "F16", W.astype(np.float16), why + "; dequantized to F16"


# --------------------------------------------------------------------------- tokenizer
def tokenizer_fields(folder, vocab_size):
    """(tokens, token types, merges, pre) for llama.cpp's byte-level BPE ('gpt2') vocab."""
    import gguf
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
    except (OSError, ValueError) as e:
        raise RefqError(f"{path}: cannot read ({e}); GGUF needs the tokenizer") from None
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if model.get("type") != "BPE" or kinds[-1:] != ["ByteLevel"]:
        raise RefqError(f"{path}: only byte-level BPE tokenizers map to llama.cpp's vocabularies "
                        f"(this one is {model.get('type')} with pre-tokenizers {kinds})")
    if kinds == ["ByteLevel"]:
        pre_name = "gpt-2"               # llama.cpp's name (llama-vocab.cpp); "gpt2" is refused
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        pre_name = "smollm"              # GPT-2's regex with single digits (llama.cpp "smollm")
    else:
        raise RefqError(f"{path}: pre-tokenizers {kinds} have no llama.cpp equivalent known to refq")
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = max(vocab_size, max(tokens) + 1)
    tok_list = [tokens.get(i, f"[PAD{i}]") for i in range(n)]
    type_list = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:      # gguf's writer drops an empty array, and llama.cpp requires the key
        raise RefqError(f"{path}: a BPE tokenizer without merges cannot be written for llama.cpp")
    return tok_list, type_list, merges, pre_name


# --------------------------------------------------------------------------- file
def write_gguf(path, src, cfg, get_tensor, linears, exact=False, log=None):
    """Write the GGUF file `path`.

    src: the folder holding tokenizer.json / tokenizer_config.json;
    cfg: LlamaConfig; get_tensor(HF name) -> float32 array for the
    unquantized tensors; linears: {full linear name: QuantizedWeight or dense
    array}. Returns a list of {"name", "type", "exact", "note"} per linear.
    """
    import gguf

    from llama_np.gguf_import import _BLOCK_NAMES, _TOP_NAMES
    if cfg.model_type not in ("llama", "mistral"):
        raise RefqError(f"model_type {cfg.model_type!r}: only llama/mistral models are exported "
                        "to GGUF (architecture 'llama')")
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] != "linear":
        raise RefqError(f"rope_scaling {cfg.rope_scaling['rope_type']!r} is not exported to GGUF "
                        "(only linear scaling)")
    if cfg.attention_bias:
        raise RefqError("q/k/v biases are not exported to GGUF's llama architecture")
    hf_to_gguf = {v: k for k, v in _BLOCK_NAMES.items()}
    hf_to_gguf_top = {v: k for k, v in _TOP_NAMES.items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(os.path.basename(os.path.normpath(src)))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // nh:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_vocab_size(cfg.vocab_size)

    tokens, types, merges, pre = tokenizer_fields(src, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc = {}
    if os.path.isfile(os.path.join(src, "tokenizer_config.json")):
        with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
            tc = json.load(f)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(int(cfg.bos_token_id))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    w.add_add_eos_token(False)
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])

    report, kinds = [], []
    w.add_tensor("token_embd.weight", np.ascontiguousarray(get_tensor("model.embed_tokens.weight")))
    for i in range(cfg.num_hidden_layers):
        pre_hf = f"model.layers.{i}."
        for hf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            w.add_tensor(f"blk.{i}.{hf_to_gguf[hf]}", np.ascontiguousarray(get_tensor(pre_hf + hf)))
        for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            full = pre_hf + short
            kind, data, note = map_linear(full, linears[full], exact)
            rows = None
            if short == "self_attn.q_proj":
                rows = permute_rows(data.shape[0], nh)
            elif short == "self_attn.k_proj":
                rows = permute_rows(data.shape[0], nkv)
            if rows is not None:
                data = data[rows]
            gname = f"blk.{i}.{hf_to_gguf[short + '.weight']}"
            raw = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
            w.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=raw)
            report.append({"name": full, "type": kind, "exact": note is None, "note": note})
            kinds.append(kind)
    w.add_tensor("output_norm.weight", np.ascontiguousarray(get_tensor("model.norm.weight")))
    if not cfg.tie_word_embeddings:
        w.add_tensor(hf_to_gguf_top["lm_head.weight"], np.ascontiguousarray(get_tensor("lm_head.weight")))
    main = max(set(kinds), key=kinds.count)
    ft = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16,
          "F32": gguf.LlamaFileType.ALL_F32}[main]
    w.add_file_type(ft)
    if main not in ("F16", "F32"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return report
