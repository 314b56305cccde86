"""GPU kernels: CUDA C in refq/kernels/cuda/*.cu, loaded with cupy.RawModule.

    refq.kernels.matmul(q, x, kernel="gpu")

x may be a numpy array (copied to the GPU, the result copied back as numpy
float32) or a CuPy array of float32 or float16 (the result stays on the GPU,
in x's dtype; fp16 activations are accumulated in fp32). The packed tensors
are copied to the GPU once per weight and kept there (the scales and zeros as
float32, the rest as stored).

CuPy is imported lazily: without it, or without a GPU, `--kernel gpu` is a
one-line RefqError. Kernel layout and numerics are described in each .cu
file; refq/kernels/gpu_mirror.py repeats them in numpy for the tests.
"""
import os

import numpy as np

from refq.errors import RefqError
from refq.kernels import as_input, register, _REGISTRY

CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")
WARPS = 4                       # common.cuh
SMEM_BYTES = 32768              # codebook LUT chunk / additive shared codebooks budget
_modules = {}


def cupy_or_error():
    try:
        import cupy
    except ImportError:
        raise RefqError("--kernel gpu: CuPy is not installed (pip install 'refq[gpu]', "
                        "i.e. cupy-cuda12x)") from None
    return cupy


def require_gpu():
    """CuPy with at least one CUDA device, or a one-line RefqError."""
    cupy = cupy_or_error()
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver
        raise RefqError(f"--kernel gpu: no usable CUDA device ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no driver'})") from None
    if n < 1:
        raise RefqError("--kernel gpu: no CUDA device found")
    return cupy


def source(name):
    """The CUDA source of cuda/<name>.cu with common.cuh inlined (for NVRTC)."""
    with open(os.path.join(CUDA_DIR, "common.cuh"), encoding="utf-8") as f:
        common = f.read().replace("#pragma once", "")
    with open(os.path.join(CUDA_DIR, name + ".cu"), encoding="utf-8") as f:
        body = f.read().replace('#include "common.cuh"', common)
    return body


def module(name):
    if name not in _modules:
        cupy = require_gpu()
        _modules[name] = cupy.RawModule(code=source(name), options=("--std=c++14",))
    return _modules[name]


def _state(q, build):
    st = q.__dict__.get("_gstate")
    if st is None:
        st = q._gstate = build()
    return st


def _csr_dev(cupy, csr):
    if csr is None or csr.nnz == 0:
        z = cupy.zeros(1, cupy.int32)
        return 0, z, z, cupy.zeros(1, cupy.float32)
    return (1, cupy.asarray(csr.rowptr.astype(np.int32)), cupy.asarray(csr.cols.astype(np.int32)),
            cupy.asarray(csr.values.astype(np.float32)))


def _i(v):
    return np.int32(v)


def gpu_matmul(q, x):
    """Checks x, runs the format's GPU kernel, returns in x's kind (numpy or CuPy)."""
    cupy = require_gpu()
    out, n = q.shape
    on_gpu = isinstance(x, cupy.ndarray)
    if on_gpu:
        if x.dtype not in (cupy.float32, cupy.float16):
            raise RefqError(f"matmul: a GPU x must be float32 or float16, got {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != n:
            raise RefqError(f"matmul: x has shape {x.shape}, weight expects (..., {n})")
        lead = x.shape[:-1]
        T = int(np.prod(lead, dtype=np.int64))
        if T == 0:
            raise RefqError(f"matmul: x has shape {x.shape}: no token (batch 0)")
        xd = cupy.ascontiguousarray(x.reshape(T, n))
    else:
        x2, lead = as_input(x, n)
        xd = cupy.asarray(x2)
    fn = _REGISTRY["gpu"].get(q.FORMAT)
    if fn is None:
        raise RefqError(f"--kernel gpu: format {q.FORMAT!r} has no GPU kernel yet "
                        f"(GPU kernels: {', '.join(sorted(_REGISTRY['gpu']))})")
    y = fn(cupy, q, xd)                                       # (T, out) on the GPU
    y = y.reshape(lead + (out,))
    return y if on_gpu else cupy.asnumpy(y).astype(np.float32, copy=False)


def _launch(cupy, kern, out, T, args, smem=0):
    grid = ((out + WARPS - 1) // WARPS, T)
    kern(grid, (32, WARPS), args, shared_mem=smem)


# --------------------------------------------------------------------------- uniform
@register("gpu", "uniform", "uniform_sparse")
def uniform_gpu(cupy, q, x):
    def build():
        q._validate()
        return {"qw": cupy.asarray(np.ascontiguousarray(q.qweight)),
                "s": cupy.asarray(q.scales.astype(np.float32)),
                "z": cupy.asarray(q.zeros().astype(np.float32)),
                "perm": None if q.perm is None else cupy.asarray(q.perm.astype(np.int64)),
                "csr": _csr_dev(cupy, getattr(q, "outliers", None))}
    st = _state(q, build)
    out, n = q.shape
    T = x.shape[0]
    xs = x if st["perm"] is None else cupy.ascontiguousarray(x[:, st["perm"]])
    y = cupy.empty((T, out), x.dtype)
    kern = module("uniform").get_function("uniform_f32" if x.dtype == cupy.float32 else "uniform_f16")
    has, rowptr, cols, vals = st["csr"]
    G = st["s"].shape[1]
    _launch(cupy, kern, out, T, (st["qw"], st["s"], st["z"], xs, x, rowptr, cols, vals, y,
                                 _i(out), _i(n), _i(st["qw"].shape[1]), _i(G),
                                 _i(q.group_size or n), _i(q.bits), _i(has)))
    return y


# --------------------------------------------------------------------------- codebook
def codebook_chunk(bits):
    return max(1, SMEM_BYTES // (4 << bits))


@register("gpu", "codebook")
def codebook_gpu(cupy, q, x):
    def build():
        q._validate()
        return {"widths": [(b, cupy.asarray(np.ascontiguousarray(q.qweights[b])),
                            cupy.asarray(np.ascontiguousarray(q.codebooks[b])),
                            cupy.asarray(q.columns(b).astype(np.int32))) for b in sorted(q.qweights)],
                "csr": _csr_dev(cupy, q.outliers)}
    st = _state(q, build)
    out, n = q.shape
    T = x.shape[0]
    sfx = "f32" if x.dtype == cupy.float32 else "f16"
    mod = module("codebook")
    yf = cupy.zeros((T, out), cupy.float32)
    for b, qw, cb, cols in st["widths"]:
        CH = codebook_chunk(b)
        _launch(cupy, mod.get_function("codebook_" + sfx), out, T,
                (qw, cb, cols, x, yf, _i(out), _i(n), _i(cols.shape[0]), _i(qw.shape[1]), _i(b),
                 _i(CH)), smem=CH * (4 << b))
    has, rowptr, cols, vals = st["csr"]
    if has:
        _launch(cupy, mod.get_function("csr_add_" + sfx), out, T,
                (rowptr, cols, vals, x, yf, _i(out), _i(n)))
    return yf if x.dtype == cupy.float32 else yf.astype(cupy.float16)


# --------------------------------------------------------------------------- additive
@register("gpu", "additive")
def additive_gpu(cupy, q, x):
    def build():
        q._validate()
        return {"codes": cupy.asarray(np.ascontiguousarray(q.codes)),
                "cb": cupy.asarray(np.ascontiguousarray(q.codebooks)),
                "s": cupy.asarray(q.scales.astype(np.float32))}
    st = _state(q, build)
    out, n = q.shape
    T = x.shape[0]
    M, B, g = q.num_codebooks, q.nbits_per_codebook, q.in_group_size
    smem = M * (1 << B) * g * 4
    use_smem = smem <= SMEM_BYTES
    name = "additive_%s_%s" % ("u8" if st["codes"].dtype == cupy.uint8 else "u16",
                               "f32" if x.dtype == cupy.float32 else "f16")
    y = cupy.empty((T, out), x.dtype)
    _launch(cupy, module("additive").get_function(name), out, T,
            (st["codes"], st["cb"], st["s"], x, y, _i(out), _i(n // g), _i(M), _i(B), _i(g),
             _i(int(use_smem))), smem=smem if use_smem else 0)
    return y
