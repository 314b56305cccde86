"""Convert a llama.cpp GGUF file into a Hugging Face folder llama_np can load.

The default model ships as GGUF (SmolLM2-135M-Instruct, Q4_1 weights, Q8_0
embedding). This writes:

    config.json          LlamaForCausalLM hyper-parameters from the GGUF keys
    model.safetensors    every tensor dequantized to float32, HF names
    tokenizer.json       byte-level BPE built from the GGUF vocabulary and merges
    generation_config.json, tokenizer_config.json (bos/eos, chat template)

Two llama.cpp conventions are undone on the way:
  * GGUF stores shapes fastest-dimension first: a (out, in) matrix is listed
    as [in, out]; gguf's dequantize already returns the numpy (out, in) array.
  * llama.cpp's converter permutes the rows of q_proj and k_proj, per head,
    from HF's "rotate half" RoPE layout to its interleaved one:
        W.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)
    so row (h, i, j) of GGUF holds HF row (h, j, i). unpermute() inverts it.
"""
import json
import os

import numpy as np

from refq.errors import RefqError

# GGUF tensor name (per block, after "blk.N.") -> HF name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute(w, n_head):
    """Undo llama.cpp's q/k row permutation.  w (n_head*hd, ...) -> same shape."""
    hd = w.shape[0] // n_head
    return (w.reshape(n_head, hd // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def hf_name(gguf_name):
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, n, rest = gguf_name.split(".", 2)
        if rest in _BLOCK_NAMES:
            return f"model.layers.{n}.{_BLOCK_NAMES[rest]}"
    return None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path):
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise RefqError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF "
                        "files can be converted")
    k = lambda s: _field(reader, f"llama.{s}")
    n_head, n_kv = int(k("attention.head_count")), int(k("attention.head_count_kv"))
    d = int(k("embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    # eps is stored as float32: print its shortest float32 form (1e-05, not 9.99e-06)
    eps = float(str(np.float32(k("attention.layer_norm_rms_epsilon"))))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(k("vocab_size") or len(tokens)),
        "hidden_size": d,
        "intermediate_size": int(k("feed_forward_length")),
        "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(k("rope.dimension_count") or d // n_head),
        "rms_norm_eps": eps,
        "rope_theta": float(k("rope.freq_base") or 10000.0),
        "max_position_embeddings": int(k("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    return cfg


def gguf_tokenizer(reader, path):
    """A byte-level BPE tokenizers.Tokenizer from the GGUF vocabulary and merges.

    The GGUF "smollm" pre-tokenizer is GPT-2's regex with every digit split
    off on its own, i.e. HF's Digits(individual_digits=True) then ByteLevel.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise RefqError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE "
                        "('gpt2') tokenizers can be converted")
    if pre not in ("smollm", "gpt-2", "gpt2", "default"):
        raise RefqError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                        "(supported: smollm, gpt-2)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = CONTROL (llama.cpp): special tokens, never split
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == 3]
    tok.add_special_tokens(special)
    return tok


def convert_gguf(gguf_path, out_dir, progress=True):
    """Write the HF folder for gguf_path into out_dir (which must not exist).

    Written into a temporary sibling folder first and renamed at the end, so an
    interrupted conversion leaves nothing behind under out_dir.
    """
    import gguf
    from safetensors.numpy import save_file
    from tqdm import tqdm

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:
        raise RefqError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    cfg = gguf_config(reader, gguf_path)
    tok = gguf_tokenizer(reader, gguf_path)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    tensors = {}
    for t in tqdm(reader.tensors, desc="converting GGUF", unit="tensor",
                  disable=not progress):
        name = hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        w = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                 dtype=np.float32)
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute(w, n_head)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute(w, n_kv)
        tensors[name] = np.ascontiguousarray(w)

    tmp = out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=False)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})  # one key: safetensors writes keys in hash order
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        tokens = _field(reader, "tokenizer.ggml.tokens")
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                "bos_token": tokens[cfg["bos_token_id"]], "eos_token": tokens[cfg["eos_token_id"]],
                "model_max_length": cfg["max_position_embeddings"]}
        tmpl = _field(reader, "tokenizer.chat_template")
        if tmpl:
            tcfg["chat_template"] = tmpl
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tcfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg["bos_token_id"],
                       "eos_token_id": cfg["eos_token_id"]}, f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
