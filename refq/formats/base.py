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
    component name used in bits_breakdown) and META_FIELDS, and implement
    dequantize, tensors and from_tensors (which starts with read_meta).
    """

    FORMAT = None
    FORMAT_VERSION = None
    COMPONENTS = {}
    META_FIELDS = ()   # attributes that meta() stores beside the common keys

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

    @classmethod
    def from_tensors(cls, tensors, meta):
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------
    def meta(self):
        """-> JSON-serialisable dict: format, format_version, method, shape, the
        format's META_FIELDS, options, and info (diagnostics; the wall time is
        left out so that checkpoints are reproducible)."""
        m = {"format": self.FORMAT, "format_version": self.FORMAT_VERSION,
             "method": self.method, "shape": list(self.shape)}
        m.update({k: getattr(self, k) for k in self.META_FIELDS})
        m["options"] = dict(self.options)
        m["info"] = {k: v for k, v in self.info.items() if k != "seconds"}
        return m

    @classmethod
    def read_meta(cls, tensors, meta, fields=None, check_tensors=True):
        """The checks each from_tensors starts with -> (shape, {field: value}).

        meta names this format and version; with check_tensors, no tensor
        outside COMPONENTS; meta has a valid shape and each of `fields`
        ({name: converter or None}). A failure is a RefqError naming the format.
        """
        name = cls.FORMAT
        if meta.get("format") != name:
            raise RefqError(f"{name}: meta format is {meta.get('format')!r}, not {name!r}")
        if meta.get("format_version") != cls.FORMAT_VERSION:
            raise RefqError(f"{name}: unsupported format_version {meta.get('format_version')!r} "
                            f"(this refq reads {cls.FORMAT_VERSION})")
        if check_tensors:
            unknown = set(tensors) - set(cls.COMPONENTS)
            if unknown:
                raise RefqError(f"{name}: unexpected tensors {sorted(unknown)}")
        try:
            shape = tuple(int(v) for v in meta["shape"])
            values = {k: meta[k] if conv is None else conv(meta[k])
                      for k, conv in (fields or {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise RefqError(f"{name}: meta lacks a valid {e}") from None
        return shape, values

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

    def fuse(self, others):
        """One product for self and `others`, weights that share their input x
        (llama_np multiplies q/k/v and gate/up so): an object whose .products(x)
        is [x Ŵ_selfᵀ, x Ŵ_otherᵀ...] from one kernel call (.matmul(x): the same,
        side by side), or None where the kernels cannot stack them
        (refq.kernels.fuse)."""
        from refq.kernels import fuse
        return fuse([self, *others], self.kernel)

    def prefill_weight(self):
        """The dense W_hat (out, in) float32 that many-token products multiply by
        (llama_np.batched: a layer's products over many windows), decoded once;
        or self where the kernel is a GPU one (refq.kernels.prefill_weight)."""
        from refq.kernels import prefill_weight
        return prefill_weight(self, self.kernel)

    def __repr__(self):
        return (f"{type(self).__name__}(method={self.method!r}, shape={self.shape}, "
                f"bits_per_weight={self.bits_per_weight:.4f})")


def load_quantized(tensors, meta):
    """Rebuild a QuantizedWeight from its stored tensors and meta."""
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt not in FORMATS:
        raise RefqError(f"load_quantized: unknown format {fmt!r} (known: {sorted(FORMATS)})")
    return FORMATS[fmt].from_tensors(tensors, meta)
