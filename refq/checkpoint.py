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
import hashlib
import json
import os
import shutil

import numpy as np

from refq.errors import RefqError

FORMAT_VERSION = 1
QUANT_METHOD = "refq"          # quantization_config.quant_method of a refq checkpoint
FOREIGN_METHODS = ("gptq", "aqlm")   # read by refq.interop.foreign


def quant_method(path):
    """quantization_config.quant_method of the folder's config.json, or None."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    q = d.get("quantization_config") if isinstance(d, dict) else None
    return q.get("quant_method") if isinstance(q, dict) else None


_COPY = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def model_tensors(model, quantized=None):
    """(checkpoint name, array) of every tensor a packed checkpoint of `model` stores, in
    order: embeddings, final norm, lm_head (untied), then per decoder layer its norms,
    biases and linears: a dense Linear as NAME.weight, a quantized one (from `quantized`
    {full linear name: QuantizedWeight} if given there, else the model's own) as its
    stored fields NAME.FIELD.  The one list of the model's tensor names."""
    from llama_np import Linear
    quantized = quantized or {}
    yield "model.embed_tokens.weight", model.embed_tokens
    yield "model.norm.weight", model.norm
    if not model.cfg.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", layer.input_norm
        yield p + "post_attention_layernorm.weight", layer.post_norm
        for n, b in layer.biases.items():
            yield p + n + ".bias", b
        for n, lin in layer.linears.items():
            lin = quantized.get(p + n, lin)
            if isinstance(lin, Linear):
                yield p + n + ".weight", lin.weight
            else:                                   # a QuantizedWeight: its stored fields
                for field, t in lin.tensors().items():
                    yield f"{p}{n}.{field}", t


def is_refq_checkpoint(folder):
    """The marker of a folder refq wrote: config.json whose quantization_config has
    quant_method "refq" (only such a folder may be replaced by --force; a GPTQ or
    AQLM checkpoint made by another tool is the user's, never replaced)."""
    return quant_method(folder) == QUANT_METHOD


def check_out_dir(out, force, inputs=(), log=None):
    """Refuse, before any work, an --out refq must not write (refq/outdir.py's rules):
    an existing non-empty folder without --force, one that is not a refq checkpoint
    even with --force, the current/home/root folder, one holding an input, or a
    location that cannot be created and written."""
    from refq.outdir import check_output
    check_output(out, force, is_refq_checkpoint,
                 "no config.json with quantization_config.quant_method 'refq'",
                 inputs=inputs, log=log)


def save_packed(out, src_folder, model, quantized, quantization_config, force=False):
    """Write the packed checkpoint of `model` into folder `out`.

    quantized: {full linear name: QuantizedWeight}; every other tensor of the
    model (embeddings, norms, biases, lm_head) is stored as it is in memory.
    """
    from safetensors.numpy import save_file

    check_out_dir(out, force)
    from llama_np import Linear
    tensors = dict(model_tensors(model, quantized))
    layers_meta = {}                                 # every quantized linear, in model order
    for i, layer in enumerate(model.layers):
        for n, lin in layer.linears.items():
            q = quantized.get(f"model.layers.{i}.{n}", lin)
            if not isinstance(q, Linear):
                layers_meta[f"model.layers.{i}.{n}"] = q.meta()
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    with open(os.path.join(src_folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    qc = dict(quantization_config)
    qc.update(quant_method=QUANT_METHOD, format_version=FORMAT_VERSION, layers=layers_meta,
              sha256={k: tensor_sha256(tensors[k]) for k in sorted(tensors)})
    cfg["quantization_config"] = qc

    from refq.outdir import commit, tmp_path
    tmp = tmp_path(out)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
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
        commit(tmp, out)   # the old folder is only replaced when empty or --force (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tensor_sha256(a):
    """sha256 (hex) of a tensor's bytes as stored in model.safetensors (C order)."""
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def verify_sha256(ckpt, qc, path):
    """Every tensor of the checkpoint has the sha256 recorded in quantization_config
    (flipped bits, a truncated copy, a tensor added or removed: an error naming it)."""
    want = qc["sha256"]
    have = set(ckpt.names())
    for name in sorted(have - set(want)):
        raise RefqError(f"{ckpt.folder}: tensor {name!r} is not listed in "
                        f"quantization_config.sha256 of {path}")
    for name, h in want.items():
        if name not in have:
            raise RefqError(f"{ckpt.folder}: tensor {name!r} listed in "
                            "quantization_config.sha256 is missing")
        if tensor_sha256(ckpt.raw(name)) != h:
            raise RefqError(f"{ckpt.folder}: tensor {name!r} does not match its sha256 in "
                            "quantization_config (corrupt or modified file)")


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
    from refq.methods import METHODS
    m = qc.get("method")
    if not isinstance(m, str) or m not in METHODS:
        raise RefqError(f"{path}: quantization_config.method {m!r} is not a refq method "
                        f"(known: {', '.join(METHODS)})")
    if not isinstance(qc.get("options", {}), dict):
        raise RefqError(f"{path}: quantization_config.options is not an object")
    for name, meta in qc["layers"].items():
        if not isinstance(meta, dict):
            raise RefqError(f"{path}: quantization_config.layers[{name!r}] is not an object")
    sums = qc.get("sha256")       # absent in checkpoints written before it existed
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in sums.items())):
        raise RefqError(f"{path}: quantization_config.sha256 is not an object of "
                        "tensor name -> 64 hex digits")
    return cfg, qc


def load_quantized_linear(ckpt, name, meta):
    """The QuantizedWeight stored under `name` in a packed checkpoint."""
    from refq.api import load_quantized
    prefix = name + "."
    # (NAME.bias is the linear's bias, a dense tensor beside it: q/k/v of Qwen2-style models)
    fields = {k[len(prefix):]: np.asarray(ckpt.raw(k)) for k in ckpt.names()
              if k.startswith(prefix) and k[len(prefix):].isidentifier()
              and k[len(prefix):] != "bias"}
    if not fields:
        raise RefqError(f"{ckpt.folder}: quantized linear {name!r} has no stored tensors")
    try:
        q = load_quantized(fields, meta)
    except RefqError as e:
        raise RefqError(f"{ckpt.folder}: {name}: {e}") from None
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise RefqError(f"{ckpt.folder}: {name}: corrupt stored tensors ({type(e).__name__}: {e})") from None
    return q


def load_packed(folder, verify=True):
    """(LlamaConfig, Checkpoint, quantization_config, {name: QuantizedWeight}).

    verify: check every tensor against quantization_config.sha256 (when the
    checkpoint records it); --no-verify skips it (BENCHMARKS.md has its cost).
    A GPTQ / AQLM checkpoint made by another tool is read by refq.interop.foreign."""
    from refq.interop.foreign import foreign_method, load_foreign
    if foreign_method(folder):
        return load_foreign(folder)
    from llama_np import Checkpoint, LlamaConfig
    _, qc = read_quantization_config(folder)
    cfg = LlamaConfig.load(folder)
    ckpt = Checkpoint(folder)
    if verify and "sha256" in qc:
        verify_sha256(ckpt, qc, os.path.join(folder, "config.json"))
    qws = {n: load_quantized_linear(ckpt, n, m) for n, m in qc["layers"].items()}
    from llama_np.model import LINEAR_NAMES
    for i in range(cfg.num_hidden_layers):     # every linear: quantized or stored dense
        for n in LINEAR_NAMES:
            full = f"model.layers.{i}.{n}"
            if full not in qws and full + ".weight" not in ckpt:
                raise RefqError(f"{folder}: linear {full} has no entry in "
                                "quantization_config.layers and no dense weight")
    return cfg, ckpt, qc, qws


def load_packed_model(folder, kernel="cpu", verify=True):
    """A Llama whose quantized linears are QuantizedWeight objects (.matmul).

    kernel: "cpu" | "gpu" | "dequant", the refq.kernels backend their matmul
    uses. The packed tensors stay memory-mapped; only "dequant" keeps a dense
    float32 copy of each weight.
    """
    from llama_np import Linear, Llama
    from refq.kernels import check_kernel
    check_kernel(kernel)
    cfg, ckpt, qc, qws = load_packed(folder, verify)
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
