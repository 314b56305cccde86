"""The integer-activation kernel ("cpu-int", refq.kernels.cpu.uniform_int_cpu).

It is not exact: x is rounded per block to int16 with one scale per block. The
truth here is float64 x @ dequantize().T, and the tolerance is the bound stated
in uniform_int_cpu's docstring, recomputed here from its definition (block scales
sx_b = max |x| / 32767 over blocks of min(g, 128) stored columns, for the shapes
used below), on adversarial inputs: outliers, all-equal, zeros, a zero block.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from refq.formats.outliers import CSR
from refq.formats.uniform import UniformWeight
from refq.formats.uniform_sparse import UniformSparseWeight
from refq.kernels import kernel_for, matmul

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 2.0 ** -24                                   # float32 unit roundoff


def uniform(rng, out, n, bits, g, sym=False, perm=False, sparse=False):
    G = -(-n // (g or n))
    codes = rng.integers(0, 2 ** bits, (out, n))
    scales = rng.random((out, G)) * 0.1 + 0.01
    zeros = rng.integers(0, 2 ** bits, (out, G))
    p = rng.permutation(n) if perm else None
    if sparse:
        S = np.where(rng.random((out, n)) < 0.05, rng.standard_normal((out, n)), 0)
        return UniformSparseWeight.from_codes(codes, scales, zeros, bits, g, sym, p, S=S)
    return UniformWeight.from_codes(codes, scales, zeros, bits, g, sym, p)


def derived_bound(q, x):
    """(T, out) float64: ½ Σ_c |Ŵ[r,c]| sx_b(c) + (B + G + 4) u Σ_c s (q + |z|) (|x| + sx/2)
    in STORED column order, blocks of A = min(g, 128) stored columns from column 0."""
    out, n = q.shape
    g = q.group_size or n
    A = min(g, 128)
    x = np.asarray(x, np.float64)
    xs = x if q.perm is None else x[:, q.perm.astype(np.int64)]       # stored order
    T = xs.shape[0]
    nblk = -(-n // A)
    xpad = np.zeros((T, nblk * A))
    xpad[:, :n] = xs
    sx = np.abs(xpad.reshape(T, nblk, A)).max(axis=2) / 32767          # (T, B)
    sx_col = np.repeat(sx, A, axis=1)[:, :n]                            # (T, n)
    gidx = np.arange(n) // g
    s = q.scales.astype(np.float64)[:, gidx]                            # (out, n)
    z = q.zeros().astype(np.float64)[:, gidx]
    codes = q.codes().astype(np.float64)
    W_stored = s * (codes - z)
    G = q.n_groups
    rounding = 0.5 * sx_col @ np.abs(W_stored).T                        # (T, out)
    floats = (nblk + G + 4) * U * ((np.abs(xs) + sx_col / 2) @ (s * (codes + np.abs(z))).T)
    return rounding + floats


def x_kinds(rng, T, n):
    g = rng.standard_normal((T, n))
    out = g.copy()
    out[:, rng.choice(n, 3, replace=False)] *= 1e4                   # large outliers
    zblock = g.copy()
    zblock[:, :64] = 0                                                # one all-zero block
    tiny = g * 1e-30                                                  # near float32 underflow
    return {"gaussian": g, "outliers": out, "all-equal": np.full((T, n), 0.37),
            "all-equal-negative": np.full((T, n), -3.0), "zeros": np.zeros((T, n)),
            "zero-block": zblock, "tiny": tiny}


CASES = [
    ("w2 g128", dict(bits=2, g=128)),
    ("w3 g128 act-order", dict(bits=3, g=128, perm=True)),
    ("w3 g64 ragged", dict(bits=3, g=64, n=200)),
    ("w3 g20 (4 codes a word)", dict(bits=3, g=20, n=100)),
    ("w4 g32 sym", dict(bits=4, g=32, sym=True)),
    ("w8 per-row", dict(bits=8, g=None)),
    ("w3 per-row", dict(bits=3, g=None)),
    ("w4 g64 + csr", dict(bits=4, g=64, perm=True, sparse=True)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_int_kernel_within_its_derived_bound(name, kw):
    rng = np.random.default_rng(0)
    kw = dict(kw)
    n = kw.pop("n", 256)
    q = uniform(rng, 23, n, kw.pop("bits"), kw.pop("g"), **kw)
    assert kernel_for(q, "cpu-int") == "cpu-int"
    W = q.dequantize().astype(np.float64)
    for T in (1, 3):
        for kind, x in x_kinds(rng, T, n).items():
            x32 = x.astype(np.float32)
            x64 = x32.astype(np.float64)
            ref = x64 @ W.T
            y = matmul(q, x32, "cpu-int")
            assert y.dtype == np.float32 and np.isfinite(y).all()
            bound = derived_bound(q, x64)
            if q.FORMAT == "uniform_sparse":        # + the exact-float CSR product
                S = np.abs(q.outliers.to_dense()).astype(np.float64)
                bound = bound + 64 * U * (np.abs(x64) @ S.T)
            err = np.abs(y - ref)
            assert (err <= bound + 1e-37).all(), (name, T, kind, float((err - bound).max()))
            if kind == "zeros":
                assert not y.any()
            if kind.startswith("all-equal"):      # x / sx = ±32767: no activation rounding
                assert float(err.max()) <= 1e-6 * float((np.abs(x64) @ np.abs(W).T).max())


def test_bound_is_tight_enough_to_mean_something():
    """On gaussian x the int kernel does differ from the exact one, by far less than 1e-3,
    and the bound is within ~100x of the observed error (it is not vacuous)."""
    rng = np.random.default_rng(1)
    q = uniform(rng, 64, 512, 3, 128, perm=True)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    ref = x.astype(np.float64) @ q.dequantize().astype(np.float64).T
    y = matmul(q, x, "cpu-int")
    err = np.abs(y - ref)
    assert 0 < err.max() < 1e-3 * np.abs(ref).max()
    assert derived_bound(q, x).max() < 200 * err.max()
    assert not np.array_equal(y, matmul(q, x, "cpu"))


def test_fallbacks_are_the_exact_kernel():
    """Non-finite x and formats without an integer variant run the exact kernel: the
    same bits as kernel "cpu"."""
    rng = np.random.default_rng(2)
    q = uniform(rng, 17, 128, 2, 32)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    x[1, 5] = np.nan
    y = matmul(q, x, "cpu-int")
    assert np.array_equal(y, matmul(q, x, "cpu"), equal_nan=True) and np.isnan(y[1]).all()
    from refq.formats.codebook import CodebookWeight
    cb = CodebookWeight.from_codes(rng.integers(0, 4, (9, 16)), [np.sort(rng.standard_normal(4))] * 16,
                                   np.full(16, 2, np.uint8))
    assert kernel_for(cb, "cpu-int") == "cpu"
    xc = rng.standard_normal((1, 16)).astype(np.float32)
    assert np.array_equal(matmul(cb, xc, "cpu-int"), matmul(cb, xc, "cpu"))


def test_large_batches_use_the_exact_blas_path():
    rng = np.random.default_rng(3)
    q = uniform(rng, 30, 128, 4, 32)
    x = rng.standard_normal((40, 128)).astype(np.float32)
    assert np.array_equal(matmul(q, x, "cpu-int"), matmul(q, x, "cpu"))


THREADS_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {repo!r})
import numba
import refq.kernels.cpu as kc
from test_kernels_int import CASES, uniform
kc.PAR_MIN_WORK = 0          # the parallel kernels even for these small products
out = []
for name, kw in CASES:
    kw = dict(kw)
    n = kw.pop("n", 256)
    q = uniform(np.random.default_rng(0), 37, n, kw.pop("bits"), kw.pop("g"), **kw)
    for T in (1, 4):
        x = np.random.default_rng(T).standard_normal((T, n)).astype(np.float32)
        out.append(q.matmul(x, kernel="cpu-int"))
np.save(sys.argv[1], np.concatenate([o.ravel() for o in out]))
print(numba.get_num_threads())
"""


def test_int_kernel_bit_identical_with_1_and_2_threads(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(THREADS_SCRIPT.format(repo=REPO))
    res = []
    for nt in (1, 2):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(nt), OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
        p = subprocess.run([sys.executable, str(script), str(tmp_path / f"y{nt}.npy")],
                           env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.strip() == str(nt)
        res.append(np.load(tmp_path / f"y{nt}.npy"))
    assert res[0].tobytes() == res[1].tobytes()
