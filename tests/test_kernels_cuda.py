"""CUDA kernels: every .cu compiles (nvcc --ptx, sm_80 and sm_90); the numpy
mirrors of their thread/block decomposition equal x @ dequantize().T on the
CPU; on a GPU, the kernels equal the mirrors / the reference (fp32 and fp16)."""
import glob
import os
import shutil
import subprocess

import numpy as np
import pytest

from refq.kernels import gpu_mirror as gm
from test_kernels_cpu import additive, codebook, rel, uniform

CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "refq", "kernels", "cuda")
SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def test_there_are_kernels():
    assert {os.path.basename(s) for s in SOURCES} >= {"uniform.cu", "codebook.cu", "additive.cu"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_nvcc_compiles(src, arch, tmp_path):
    p = subprocess.run(["nvcc", "--ptx", f"-arch={arch}", "-I", CUDA_DIR, "-Werror", "all-warnings",
                        "-o", str(tmp_path / "k.ptx"), src], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert ".entry" in ptx


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_gpu_py_source_is_what_nvcc_compiles(tmp_path):
    """gpu.source() (common.cuh inlined for NVRTC) compiles standalone too."""
    from refq.kernels.gpu import source
    for name in ("uniform", "codebook", "additive"):
        f = tmp_path / f"{name}.cu"
        f.write_text(source(name))
        p = subprocess.run(["nvcc", "--ptx", "-arch=sm_80", "-o", str(tmp_path / "k.ptx"), str(f)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]


# ------------------------------------------------------------------ numpy mirrors (CPU)
def _uniform_mirror(q, x):
    xs = x if q.perm is None else np.ascontiguousarray(x[:, q.perm.astype(np.int64)])
    o = getattr(q, "outliers", None)
    csr = None if o is None or o.nnz == 0 else (o.rowptr, o.cols.astype(np.int32),
                                                o.values.astype(np.float32))
    return gm.uniform_mirror(q.qweight, q.scales.astype(np.float32), q.zeros(), xs, x, csr,
                             q.bits, q.group_size or q.shape[1])


MIRRORS = [
    ("uniform u4 g16 odd", lambda r: uniform(r, 9, 77, 4, 16), _uniform_mirror),
    ("uniform u3 perm + csr", lambda r: uniform(r, 6, 70, 3, 20, perm=True,
                                                S=np.where(r.random((6, 70)) < 0.1, 1.0, 0)),
     _uniform_mirror),
    ("codebook 2/3/4 + csr", lambda r: codebook(r, 7, 45), gm.codebook_mirror),
    ("additive 2x8 g8", lambda r: additive(r, 5, 48, 2, 8, 8),
     lambda q, x: gm.additive_mirror(q.codes, q.codebooks, q.scales.astype(np.float32), x)),
]


@pytest.mark.parametrize("name,build,mirror", MIRRORS, ids=[m[0] for m in MIRRORS])
def test_mirror_equals_reference(name, build, mirror):
    rng = np.random.default_rng(0)
    q = build(rng)
    x = rng.standard_normal((2, q.shape[1])).astype(np.float32)
    assert rel(mirror(q, x), x @ q.dequantize().T) <= 1e-5


def test_codebook_mirror_chunks():
    """Small LUT chunks (several per width) give the same result."""
    rng = np.random.default_rng(1)
    q = codebook(rng, 6, 70, widths=(2,), outliers=False)
    x = rng.standard_normal((1, 70)).astype(np.float32)
    yf = np.zeros((1, 6), np.float32)
    gm.codebook_width_mirror(q.qweights[2], q.codebooks[2], q.columns(2).astype(np.int32), x, yf, 2, 7)
    assert rel(yf, x @ q.dequantize().T) <= 1e-5


def test_warp_sum_order():
    v = np.arange(32, dtype=np.float32)
    assert gm.warp_sum(v) == np.float32(496)


# ------------------------------------------------------------------ on a GPU
def _gpu():
    try:
        from refq.kernels.gpu import require_gpu
        return require_gpu()
    except Exception:
        return None


@pytest.mark.skipif(_gpu() is None, reason="no CUDA device / CuPy")
@pytest.mark.parametrize("name,build,mirror", MIRRORS, ids=[m[0] for m in MIRRORS])
def test_gpu_kernels(name, build, mirror):
    cupy = _gpu()
    rng = np.random.default_rng(0)
    q = build(rng)
    W = q.dequantize()
    for T in (1, 2, 17):
        x = rng.standard_normal((T, q.shape[1])).astype(np.float32)
        y = q.matmul(x, kernel="gpu")
        assert rel(y, x @ W.T) <= 1e-5
        if T <= 2:
            assert rel(y, mirror(q, x)) <= 1e-6
        xh = cupy.asarray(x.astype(np.float16))
        yh = q.matmul(xh, kernel="gpu")
        assert yh.dtype == cupy.float16
        ref = x.astype(np.float16).astype(np.float32) @ W.T
        assert rel(cupy.asnumpy(yh).astype(np.float32), ref) <= 2e-3      # fp16 output rounding
