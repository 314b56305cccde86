"""Matmul kernels that read the packed tensors directly: y = x Ŵᵀ.

    refq.kernels.matmul(q, x, kernel="cpu")   x (..., in) -> (..., out) float32

`kernel` is one of
    "cpu"      numba kernels (refq/kernels/cpu.py): unpack / look up on the fly
               for batches below BLAS_MIN_BATCH tokens; from there on,
               dequantize a tile of rows at a time and multiply it with BLAS
               (never a whole dense copy of the weight);
    "cpu-int"  "cpu", except that the small-batch uniform products (RTN, GPTQ,
               QuantEase, SpQR) quantize x per block to int16 and multiply-add
               in int32 (cpu.uniform_int_cpu: NOT exact, within a stated bound);
               other formats and the large-batch BLAS path are "cpu";
    "gpu"      CUDA kernels through CuPy (refq/kernels/gpu.py, cuda/*.cu);
    "dequant"  the reference: dequantize once (kept), then x @ W_hat.T.

Dispatch is a registry, format name -> function, one per backend, so adding a
format's kernel is one decorated function:

    @register("cpu", "myformat")
    def myformat_cpu(q, x):          # x (T, in) float32 C-contiguous, T >= 1
        return y                     # (T, out) float32

    @register("dequant_rows", "myformat")     # optional: the large-batch path
    def myformat_rows(q, r0, r1):    # -> W_hat[r0:r1] (r1 - r0, in) float32

    @register("fuse", "myformat")             # optional: weights sharing an input
    def myformat_fuse(qs, kernel):   # -> fn(x2) = x2 [W_hat_1; W_hat_2; ...].T, or None
        return fn                    # (llama_np's q/k/v, gate/up: fuse(), FusedProduct)

A format without a "cpu" kernel runs through "dequant" (and says so in
`kernel_for(q, "cpu")`). Inputs are checked here, once, for every backend:
x must be a real floating array (float16/float64 are converted, a strided
array is copied) with `in` features and at least one token; anything else is
a one-line RefqError.
"""
import numpy as np

from refq.errors import RefqError

KERNELS = ("cpu", "cpu-int", "gpu", "dequant")

# Batches of at least this many tokens go through dequantize-a-tile + BLAS on
# the CPU (formats with a "dequant_rows" function). A cpu kernel may lower it
# per weight with an attribute fn.blas_min_batch(q). Measured on 4096x4096,
# one thread, kernel vs tile+BLAS side by side (BENCHMARKS.md, issue #8):
# 4-bit uniform: kernel faster up to 8 tokens, slower at 16; 2-bit: faster up
# to 4, slower at 8.
BLAS_MIN_BATCH = 12
# Rows per dequantized tile on the BLAS path: about 4 MB of float32 per tile.
TILE_FLOATS = 1 << 20

_REGISTRY = {"cpu": {}, "cpu-int": {}, "gpu": {}, "dequant_rows": {}, "fuse": {}}
_CPU_LOADED = False     # refq.kernels.cpu imported (its kernels registered)


def register(backend, *formats):
    """Decorator: fn becomes the `backend` kernel of each format name."""
    if backend not in _REGISTRY:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        for f in formats:
            _REGISTRY[backend][f] = fn
        return fn
    return deco


def _load_backend(backend):
    """Import the module that registers the kernels of `backend`."""
    global _CPU_LOADED
    if backend in ("cpu", "cpu-int", "dequant_rows", "fuse"):
        import refq.kernels.cpu  # noqa: F401  (registers on import)
        _CPU_LOADED = True
    elif backend == "gpu":
        import refq.kernels.gpu  # noqa: F401


def formats_with(backend):
    """Sorted format names that have a `backend` kernel."""
    _load_backend(backend)
    return sorted(_REGISTRY[backend])


def kernel_for(q, kernel):
    """The backend that will really run q's products for `kernel`."""
    if kernel == "dequant":
        return "dequant"
    _load_backend(kernel)
    if kernel == "cpu-int" and q.FORMAT not in _REGISTRY[kernel]:
        kernel = "cpu"                      # formats without an integer variant: exact kernels
    return kernel if q.FORMAT in _REGISTRY[kernel] else "dequant"


def check_kernel(kernel):
    if kernel not in KERNELS:
        raise RefqError(f"--kernel {kernel!r}: must be one of {', '.join(KERNELS)}")
    if kernel == "gpu":
        from refq.kernels.gpu import require_gpu
        require_gpu()
    return kernel


def as_input(x, n_in):
    """x (..., in) -> (x2 (T, in) float32 C-contiguous, leading shape)."""
    if (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == n_in
            and x.shape[0] > 0 and x.flags.c_contiguous):
        return x, x.shape[:1]               # already what the kernels take (a decode step's x)
    if getattr(x, "__cuda_array_interface__", None) is not None:
        raise RefqError("matmul: x is a GPU array; use kernel='gpu' or pass a numpy array")
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise RefqError(f"matmul: x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise RefqError("matmul: x must have at least one dimension (..., in)")
    if x.shape[-1] != n_in:
        raise RefqError(f"matmul: x has {x.shape[-1]} features, weight expects {n_in}")
    lead = x.shape[:-1]
    T = int(np.prod(lead, dtype=np.int64))
    if T == 0:
        raise RefqError(f"matmul: x has shape {x.shape}: no token (batch 0)")
    x2 = np.ascontiguousarray(x.reshape(T, n_in), dtype=np.float32)
    return x2, lead


def dequant_matmul(q, x2):
    """The reference: x @ dequantize().T with the dense weight kept on q."""
    if q._dense is None:
        q._dense = np.ascontiguousarray(q.dequantize(), dtype=np.float32)
    return x2 @ q._dense.T


def blas_matmul(q, x2, rows_fn):
    """Large batches: W_hat in tiles of rows (rows_fn(q, r0, r1)), each times x by BLAS."""
    out, n = q.shape
    T = x2.shape[0]
    yT = np.empty((out, T), np.float32)                       # (out, T)
    step = max(1, TILE_FLOATS // max(1, n))
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        np.matmul(rows_fn(q, r0, r1), x2.T, out=yT[r0:r1])
    return np.ascontiguousarray(yT.T)


def prefill_weight(q, kernel="cpu"):
    """What a many-token product of q multiplies by (llama_np.batched, e.g. the
    windows of a perplexity run): the dense W_hat (out, in) float32, decoded once
    for all the products of a layer rather than tile by tile in each:

        "cpu", "cpu-int"  the format's row decoder ("dequant_rows": the values the
                          large-batch BLAS path of matmul multiplies by), else
                          dequantize();
        "dequant"         dequantize(), kept on q (as dequant_matmul);
        "gpu"             q itself: its products stay on the GPU (q.matmul).

    The row decoder runs on the calling thread only (numba single-threaded):
    perplexity decodes a layer's linears on its worker threads, one linear per
    worker (measured on 2 loaded cores: 53 ms a SmolLM2 w3 layer on one numba
    thread, 200 ms on two, whose parallel regions wait for each other).
    """
    if kernel not in KERNELS:
        raise RefqError(f"kernel {kernel!r}: must be one of {', '.join(KERNELS)}")
    if kernel == "gpu":
        return q
    if kernel == "dequant":
        if q._dense is None:
            q._dense = np.ascontiguousarray(q.dequantize(), dtype=np.float32)
        return q._dense
    import numba
    _load_backend("cpu")
    rows_fn = _REGISTRY["dequant_rows"].get(q.FORMAT)
    if rows_fn is None:
        return np.ascontiguousarray(q.dequantize(), dtype=np.float32)
    before = numba.get_num_threads()
    numba.set_num_threads(1)                # (a setting of the calling thread only)
    try:
        return np.ascontiguousarray(rows_fn(q, 0, q.shape[0]), dtype=np.float32)
    finally:
        numba.set_num_threads(before)


def _cpu_dispatch(q, kernel):
    """(fn, rows_fn, min_batch) of q for "cpu" / "cpu-int": its small-batch kernel
    (or None), its tile decoder (or None) and the batch from which the tile +
    BLAS path runs."""
    if not _CPU_LOADED:
        _load_backend("cpu")
    fmt = q.FORMAT
    fn = _REGISTRY["cpu"].get(fmt)
    if kernel == "cpu-int":
        fn = _REGISTRY["cpu-int"].get(fmt, fn)
    min_batch = getattr(fn, "blas_min_batch", None)
    min_batch = BLAS_MIN_BATCH if min_batch is None else min(BLAS_MIN_BATCH, min_batch(q))
    return fn, _REGISTRY["dequant_rows"].get(fmt), min_batch


def matmul(q, x, kernel="cpu"):
    """x (..., in) -> x @ q.dequantize().T  (..., out) float32, by `kernel`."""
    if kernel not in KERNELS:
        raise RefqError(f"kernel {kernel!r}: must be one of {', '.join(KERNELS)}")
    out, n = q.shape
    if kernel == "gpu":
        from refq.kernels.gpu import gpu_matmul
        return gpu_matmul(q, x)
    x2, lead = as_input(x, n)
    T = x2.shape[0]
    if kernel in ("cpu", "cpu-int"):
        fn, rows_fn, min_batch = _cpu_dispatch(q, kernel)
        if rows_fn is not None and T >= min_batch:
            y = blas_matmul(q, x2, rows_fn)
        elif T >= BLAS_MIN_BATCH and fn is not None:
            # large batch (e.g. a 512-token calibration or eval window) and no tiled
            # decoder: dequantize once for this product (not kept) and use BLAS; a
            # LUT kernel re-reads the codes per token and is far slower here
            y = x2 @ np.ascontiguousarray(q.dequantize(), dtype=np.float32).T
        elif fn is not None:
            y = fn(q, x2)
        else:
            y = dequant_matmul(q, x2)
    else:
        y = dequant_matmul(q, x2)
    return y if len(lead) == 1 else y.reshape(lead + (out,))


class FusedProduct:
    """x -> x [Ŵ_1; Ŵ_2; ...]ᵀ for weights that share their input x (llama_np's
    q/k/v and gate/up), made by fuse(); .products(x) gives the per-weight outputs.

    Batches the small-batch kernels take (below every weight's BLAS threshold) run
    `fn`, one kernel call over the stacked packed rows; a row's sum is computed by
    the same code as in its own weight's call, so the outputs are the same bits as
    the separate products (tests/test_kernels_fused.py). Larger batches: each
    weight's own matmul, the outputs side by side.
    """

    def __init__(self, qs, fn, kernel):
        self.qs, self.fn, self.kernel = list(qs), fn, kernel
        self.shape = (sum(q.shape[0] for q in qs), qs[0].shape[1])

    def products(self, x):
        """[x Ŵ_iᵀ for each weight] (..., out_i) float32: views of one stacked product
        for small batches, each weight's own product otherwise."""
        x2, lead = as_input(x, self.shape[1])
        if x2.shape[0] >= min(_cpu_dispatch(q, self.kernel)[2] for q in self.qs):
            return [matmul(q, x, self.kernel) for q in self.qs]
        y, ys, o = self.fn(x2), [], 0                                 # (T, Σ out)
        for q in self.qs:
            ys.append(y[:, o:o + q.shape[0]].reshape(lead + (q.shape[0],)))
            o += q.shape[0]
        return ys

    def matmul(self, x):
        """x (..., in) -> x [Ŵ_1; Ŵ_2; ...]ᵀ (..., Σ out) float32."""
        return np.concatenate(self.products(x), axis=-1)


def fuse(qs, kernel="cpu"):
    """A FusedProduct of the weights qs (same format and input width, all with
    this `kernel`), or None where their format has no "fuse" function or the
    function declines (layouts that differ: see e.g. cpu.uniform_fuse)."""
    if kernel not in ("cpu", "cpu-int") or len(qs) < 2:
        return None
    first = qs[0]
    if any(type(q) is not type(first) or getattr(q, "kernel", kernel) != kernel
           or q.shape[1] != first.shape[1] for q in qs):
        return None
    _load_backend("cpu")
    make = _REGISTRY["fuse"].get(first.FORMAT)
    fn = None if make is None else make(qs, kernel)
    return None if fn is None else FusedProduct(qs, fn, kernel)
