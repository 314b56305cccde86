"""Packed quantized checkpoints: writing, reading, checking.

A packed checkpoint is a Hugging Face-like folder (FORMAT.md has the details):

    config.json         the model's config + "quantization_config" (method,
                        options, format version, and per quantized linear its
                        format metadata: shape, bits, group size, ...)
    model.safetensors   unquantized tensors under their HF names (embeddings,
                        norms, biases, lm_head) and, for each quantized linear
                        "model.layers.{i}.{name}", its stored fields as
                        "model.layers.{i}.{name}.{field}" (codes, scales, ...)
    tokenizer.json      (+ tokenizer_config.json, generation_config.json)

The folder is written under a temporary name and renamed when complete.
"""
import json
import os
import shutil

import numpy as np

from refq.errors import RefqError

FORMAT_VERSION = 1
QUANT_METHOD = "refq"
_COPY = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def check_out_dir(out, force):
    """Refuse an existing non-empty --out folder unless --force (before any work)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RefqError(f"--out {out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise RefqError(f"--out {out}: folder exists and is not empty (use --force to replace it)")


def save_packed(out, src_folder, model, quantized, quantization_config, force=False):
    """Write the packed checkpoint of `model` into folder `out`.

    quantized: {full linear name: QuantizedWeight}; every other tensor of the
    model (embeddings, norms, biases, lm_head) is stored as it is in memory.
    """
    from safetensors.numpy import save_file

    from llama_np import Linear
    check_out_dir(out, force)
    tensors = {"model.embed_tokens.weight": model.embed_tokens,
               "model.norm.weight": model.norm}
    if not model.cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight
    layers_meta = {}
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = layer.input_norm
        tensors[pre + "post_attention_layernorm.weight"] = layer.post_norm
        for n, b in layer.biases.items():
            tensors[pre + n + ".bias"] = b
        for n, lin in layer.linears.items():
            full = pre + n
            if full in quantized:
                q = quantized[full]
                for field, t in q.tensors().items():
                    tensors[f"{full}.{field}"] = t
                layers_meta[full] = q.meta()
            elif isinstance(lin, Linear):
                tensors[full + ".weight"] = lin.weight
            else:
                raise RefqError(f"{full}: quantized but missing from the quantized set")
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    with open(os.path.join(src_folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    qc = dict(quantization_config)
    qc.update(quant_method=QUANT_METHOD, format_version=FORMAT_VERSION, layers=layers_meta)
    cfg["quantization_config"] = qc

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        # one metadata key only: the safetensors library writes the metadata
        # map in hash order, so two keys made runs differ byte-wise (the format
        # version is in config.json)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "refq"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=False)
        for name in _COPY:
            p = os.path.join(src_folder, name)
            if os.path.isfile(p):
                shutil.copyfile(p, os.path.join(tmp, name))
        if os.path.isdir(out):
            shutil.rmtree(out)  # only reached when empty or --force (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_quantization_config(folder):
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise RefqError(f"{path}: cannot read ({e})") from None
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise RefqError(f"{path}: no refq quantization_config (not a refq packed checkpoint)")
    v = qc.get("format_version")
    if v != FORMAT_VERSION:
        raise RefqError(f"{path}: quantization_config.format_version {v!r} is not supported "
                        f"(this refq reads version {FORMAT_VERSION})")
    if not isinstance(qc.get("layers"), dict):
        raise RefqError(f"{path}: quantization_config.layers missing or not an object")
    return cfg, qc


def load_quantized_linear(ckpt, name, meta):
    """The QuantizedWeight stored under `name` in a packed checkpoint."""
    from refq.api import load_quantized
    prefix = name + "."
    fields = {k[len(prefix):]: np.asarray(ckpt.raw(k)) for k in ckpt.names()
              if k.startswith(prefix) and k[len(prefix):].isidentifier()}
    if not fields:
        raise RefqError(f"{ckpt.folder}: quantized linear {name!r} has no stored tensors")
    try:
        q = load_quantized(fields, meta)
    except RefqError as e:
        raise RefqError(f"{ckpt.folder}: {name}: {e}") from None
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise RefqError(f"{ckpt.folder}: {name}: corrupt stored tensors ({type(e).__name__}: {e})") from None
    return q


def load_packed(folder):
    """(LlamaConfig, Checkpoint, quantization_config, {name: QuantizedWeight})."""
    from refq.interop.foreign import foreign_method, load_foreign
    if foreign_method(folder):          # a GPTQ / AQLM checkpoint made by another tool
        return load_foreign(folder)
    from llama_np import Checkpoint, LlamaConfig
    _, qc = read_quantization_config(folder)
    cfg = LlamaConfig.load(folder)
    ckpt = Checkpoint(folder)
    qws = {n: load_quantized_linear(ckpt, n, m) for n, m in qc["layers"].items()}
    from llama_np.model import LINEAR_NAMES
    for i in range(cfg.num_hidden_layers):     # every linear: quantized or stored dense
        for n in LINEAR_NAMES:
            full = f"model.layers.{i}.{n}"
            if full not in qws and full + ".weight" not in ckpt:
                raise RefqError(f"{folder}: linear {full} has no entry in "
                                "quantization_config.layers and no dense weight")
    return cfg, ckpt, qc, qws


def load_packed_model(folder, kernel="cpu"):
    """A Llama whose quantized linears are QuantizedWeight objects (.matmul).

    kernel: "cpu" | "gpu" | "dequant", the refq.kernels backend their matmul
    uses. The packed tensors stay memory-mapped; only "dequant" keeps a dense
    float32 copy of each weight.
    """
    from llama_np import Linear, Llama
    from refq.kernels import check_kernel
    check_kernel(kernel)
    cfg, ckpt, qc, qws = load_packed(folder)
    for q in qws.values():
        q.kernel = kernel

    def get_linear(name, shape):
        if name in qws:
            q = qws[name]
            if tuple(q.shape) != tuple(shape):
                raise RefqError(f"{folder}: {name}: stored shape {tuple(q.shape)}, "
                                f"the config needs {tuple(shape)}")
            return q
        return Linear(ckpt.get(name + ".weight", shape))

    model = Llama(cfg, ckpt.get, get_linear)
    model.quantization_config = qc
    return model
