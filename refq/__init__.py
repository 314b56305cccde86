"""refq: reference implementations of low-bit weight quantization for LLaMA models."""
__version__ = "0.1.0"
