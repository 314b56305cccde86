"""refq: reference implementations of low-bit weight quantization for LLaMA models.

    import refq
    q = refq.quantize_weight(W, H, "gptq", bits=3, group_size=128)
    q.dequantize(), q.bits_per_weight, q.bits_breakdown, q.matmul(x)
    refq.layer_loss(W, q.dequantize(), H)

The API is imported on first use (numba and scipy load slowly), so that
`refq --help` and argument errors stay fast.
"""
__version__ = "0.1.0"
__all__ = ["quantize_weight", "layer_loss", "QuantizedWeight", "load_quantized", "__version__"]


def __getattr__(name):
    if name in ("quantize_weight", "layer_loss", "QuantizedWeight", "load_quantized"):
        from refq import api
        return getattr(api, name)
    raise AttributeError(f"module 'refq' has no attribute {name!r}")
