"""refq: reference implementations of low-bit weight quantization for LLaMA models.

    import refq
    q = refq.quantize_weight(W, H, "gptq", bits=3, group_size=128)
    q.dequantize(), q.bits_per_weight, q.bits_breakdown, q.matmul(x)
    refq.layer_loss(W, q.dequantize(), H)
    run = refq.quantize_model(model, "gptq", {"bits": 3}, windows)   # refq/pipeline.py
    run.save(out_dir, model_folder)

The API is imported on first use (numba and scipy load slowly), so that
`refq --help` and argument errors stay fast.
"""
from refq._version import __version__
__all__ = ["quantize_weight", "layer_loss", "QuantizedWeight", "load_quantized",
           "quantize_model", "__version__"]


def __getattr__(name):
    if name in ("quantize_weight", "layer_loss", "QuantizedWeight", "load_quantized"):
        from refq import api
        return getattr(api, name)
    if name == "quantize_model":
        from refq.pipeline import quantize_model
        return quantize_model
    raise AttributeError(f"module 'refq' has no attribute {name!r}")
