"""QuantizedWeight: the common interface of every storage format.

A format stores a quantized (out, in) weight as a dict of numpy arrays
(`tensors()`, exactly what goes to disk) plus a JSON-serialisable `meta()`.
`bits_per_weight` is computed from those arrays, so it counts every stored
bit (including the padding bits of packed rows) and nothing else:

    bits_per_weight = 8 * sum(t.nbytes for t in tensors().values()) / (out * in)

Formats register themselves in FORMATS under their meta["format"] name;
`load_quantized(tensors, meta)` dispatches on it.
"""

import numpy as np

from refq.errors import RefqError

FORMATS = {}  # format name -> QuantizedWeight subclass


def register_format(cls):
    """Class decorator: make `cls` loadable by its FORMAT name."""
    FORMATS[cls.FORMAT] = cls
    return cls


class QuantizedWeight:
    """A quantized linear weight of shape (out, in), y = x @ W_hat.T.

    Subclasses set FORMAT, FORMAT_VERSION, COMPONENTS (tensor name ->
    component name used in bits_breakdown) and implement dequantize,
    tensors, meta and from_tensors.
    """

    FORMAT = None
    FORMAT_VERSION = None
    COMPONENTS = {}

    def __init__(self, shape, method, options, info=None):
        self.shape = (int(shape[0]), int(shape[1]))  # (out, in)
        self.method = method
        self.options = dict(options)
        self.info = dict(info or {})  # diagnostics (loss, damping used, ...)
        self._dense = None

    # ---- to be implemented by formats ------------------------------------
    def dequantize(self):
        """-> (out, in) float32."""
        raise NotImplementedError

    def tensors(self):
        """-> dict name -> ndarray: exactly what is stored on disk."""
        raise NotImplementedError

    def meta(self):
        """-> JSON-serialisable dict (format, format_version, method, shape, options, ...)."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors, meta):
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------
    @property
    def bits_per_weight(self):
        """Every stored bit divided by out*in (see module docstring)."""
        total_bytes = sum(int(t.nbytes) for t in self.tensors().values())
        return 8 * total_bytes / (self.shape[0] * self.shape[1])

    @property
    def bits_breakdown(self):
        """dict component -> bits per weight; the values sum to bits_per_weight."""
        n = self.shape[0] * self.shape[1]
        parts = {}
        for name, t in self.tensors().items():
            comp = self.COMPONENTS.get(name, name)
            parts[comp] = parts.get(comp, 0) + 8 * int(t.nbytes)
        return {comp: nbits / n for comp, nbits in parts.items()}

    # Which kernel matmul uses: "cpu" (numba, refq.kernels.cpu), "gpu" (CuPy)
    # or "dequant" (dense reference). load_packed_model(..., kernel=) sets it.
    kernel = "cpu"

    def matmul(self, x, kernel=None):
        """x (..., in) float -> x @ dequantize().T, (..., out) float32.

        Computed by refq.kernels (straight from the packed tensors for
        formats with a kernel; see refq/kernels/__init__.py).
        """
        from refq.kernels import matmul
        return matmul(self, x, kernel or self.kernel)

    def __repr__(self):
        return (f"{type(self).__name__}(method={self.method!r}, shape={self.shape}, "
                f"bits_per_weight={self.bits_per_weight:.4f})")


def load_quantized(tensors, meta):
    """Rebuild a QuantizedWeight from its stored tensors and meta."""
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt not in FORMATS:
        raise RefqError(f"load_quantized: unknown format {fmt!r} (known: {sorted(FORMATS)})")
    return FORMATS[fmt].from_tensors(tensors, meta)
