"""Load a model for inference: a Hugging Face folder or a refq packed checkpoint."""
import json
import os

from refq.errors import RefqError


def is_packed(path):
    """True if path is a refq packed checkpoint (config.json has quantization_config)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    from refq.checkpoint import QUANT_METHOD
    q = d.get("quantization_config") if isinstance(d, dict) else None
    # refq's own, or a GPTQ / AQLM checkpoint read by refq.interop.foreign
    return isinstance(q, dict) and q.get("quant_method") in (QUANT_METHOD, "gptq", "aqlm")


def load_for_inference(path=None, kernel="cpu"):
    """(model, tokenizer, folder) for --model PATH (default: the fetched SmolLM2).

    kernel: how a packed checkpoint's quantized linears multiply ("cpu",
    "gpu" or "dequant", see refq.kernels); a dense HF folder ignores it.
    """
    from llama_np import Tokenizer, load_model
    from refq.fetch import resolve_model
    from refq.kernels import check_kernel
    check_kernel(kernel)
    folder = resolve_model(path)
    if is_packed(folder):
        from refq.checkpoint import load_packed_model
        model = load_packed_model(folder, kernel=kernel)
    else:
        model = load_model(folder)
    return model, Tokenizer(folder), folder
