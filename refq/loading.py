"""Load a model for inference: a Hugging Face folder or a refq packed checkpoint."""
import numpy as np

from refq.checkpoint import (FOREIGN_METHODS, QUANT_METHOD, load_packed_model,  # noqa: F401
                             model_tensors, quant_method)
from refq.errors import RefqError


def is_packed(path):
    """True if path is a quantized checkpoint refq reads: its own packed format, or a
    GPTQ / AQLM checkpoint made by another tool (refq.interop.foreign)."""
    return quant_method(path) in (QUANT_METHOD,) + FOREIGN_METHODS


def check_finite(model, where):
    """Refuse a model with a NaN or Inf in any stored float tensor (weights, scales,
    codebooks, outlier values), naming the first such tensor: they would only show
    up later as perplexity nan."""
    for name, t in model_tensors(model):
        t = np.asarray(t)
        if t.dtype.kind != "f":
            continue
        if t.size == 0 or (np.isfinite(t.min()) and np.isfinite(t.max())):
            continue          # min/max propagate NaN and reach ±Inf; no temporary array
        finite = np.isfinite(t)
        if not finite.all():
            raise RefqError(f"{where}: tensor {name} has "
                            f"{finite.size - np.count_nonzero(finite)} NaN/Inf values")


def load_for_inference(path=None, kernel="cpu", verify=True):
    """(model, tokenizer, folder) for --model PATH (default: the fetched SmolLM2).

    kernel: how a packed checkpoint's quantized linears multiply ("cpu",
    "gpu" or "dequant", see refq.kernels); a dense HF folder ignores it.
    verify: check a packed checkpoint's tensors against their sha256
    (quantization_config.sha256); --no-verify skips it. Every model's float
    tensors are checked for NaN/Inf either way.
    """
    from llama_np import Tokenizer, load_model
    from refq.fetch import resolve_model
    from refq.kernels import check_kernel
    check_kernel(kernel)
    folder = resolve_model(path)
    if is_packed(folder):
        model = load_packed_model(folder, kernel=kernel, verify=verify)
    else:
        model = load_model(folder)
    check_finite(model, f"--model {folder}")
    return model, Tokenizer(folder), folder
