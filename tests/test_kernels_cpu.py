"""CPU kernels (refq.kernels.cpu) against x @ q.dequantize().T, plus dispatch and bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest

from refq.errors import RefqError
from refq.formats.additive import AdditiveWeight
from refq.formats.codebook import CodebookWeight
from refq.formats.outliers import CSR
from refq.formats.row_lut import RowLutWeight
from refq.formats.uniform import UniformWeight
from refq.formats.uniform_sparse import UniformSparseWeight
from refq.kernels import matmul
import refq.kernels as K

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def rel(y, ref):
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def uniform(rng, out, n, bits, g, sym=False, perm=False, S=None):
    G = -(-n // (g or n))
    codes = rng.integers(0, 2 ** bits, (out, n))
    scales = rng.random((out, G)) * 0.1 + 0.01
    zeros = rng.integers(0, 2 ** bits, (out, G))
    p = rng.permutation(n) if perm else None
    if S is not None:
        return UniformSparseWeight.from_codes(codes, scales, zeros, bits, g, sym, p, S=S)
    return UniformWeight.from_codes(codes, scales, zeros, bits, g, sym, p)


def codebook(rng, out, n, widths=(2, 3, 4), outliers=True):
    cb = rng.choice(widths, n).astype(np.uint8)
    codes = np.stack([rng.integers(0, 2 ** int(b), out) for b in cb], 1)
    cents = [np.sort(rng.standard_normal(2 ** int(b))) for b in cb]
    S = np.where(rng.random((out, n)) < 0.03, rng.standard_normal((out, n)), 0) if outliers else None
    return CodebookWeight.from_codes(codes, cents, cb, None if S is None else CSR.from_dense(S))


def additive(rng, out, n, M, B, g):
    return AdditiveWeight.from_arrays(rng.integers(0, 2 ** B, (out, n // g, M)),
                                      rng.standard_normal((M, 2 ** B, g)) * 0.1,
                                      rng.random(out) + 0.5, B)


def rowlut(rng, out, n, bits, outliers=False):
    S = np.where(rng.random((out, n)) < 0.05, rng.standard_normal((out, n)), 0) if outliers else None
    return RowLutWeight.from_codes(rng.integers(0, 2 ** bits, (out, n)),
                                   np.sort(rng.standard_normal((out, 2 ** bits)), 1), bits, S=S)


# (name, builder) over odd shapes; widths chosen to cover every kernel path while
# keeping the number of numba compilations small. Small batches run the lane kernels
# (rows padded to blocks of 64, 8 or 4 codes a word, fewer when the group size needs);
# batches from 6/12 tokens decode row tiles by units or by bit extraction for BLAS.
CASES = [
    ("u4 g16 odd", lambda r: uniform(r, 37, 77, 4, 16)),                     # ragged last group
    ("u2 g32 sym perm", lambda r: uniform(r, 41, 128, 2, 32, sym=True, perm=True)),
    ("u3 g20 perm", lambda r: uniform(r, 33, 100, 3, 20, perm=True)),       # 4 codes a word; bit-extraction tiles
    ("u3 g5 150 rows", lambda r: uniform(r, 150, 35, 3, 5)),                # 1 code a word, 3 row blocks
    ("u2 per-row 130 rows", lambda r: uniform(r, 130, 45, 2, None)),       # row padded to whole words
    ("u3 g32 perm", lambda r: uniform(r, 35, 160, 3, 32, perm=True)),       # 3-byte units, 8 codes each
    ("u3 per-row odd", lambda r: uniform(r, 18, 77, 3, None)),              # row ends inside a unit
    ("u3 g32 ragged", lambda r: uniform(r, 17, 100, 3, 32)),                # last group 4 columns
    ("u5 g16 perm", lambda r: uniform(r, 21, 80, 5, 16, perm=True)),        # 5-byte units (int64 words)
    ("u6 g8", lambda r: uniform(r, 19, 44, 6, 8, sym=True)),                # 3-byte units, 4 codes each
    ("u7 g8", lambda r: uniform(r, 16, 40, 7, 8)),                          # 7-byte units
    ("u4 g7", lambda r: uniform(r, 20, 70, 4, 7)),                          # groups off byte boundary
    ("u8 per-channel", lambda r: uniform(r, 19, 70, 8, None)),
    ("u4 g16 + csr", lambda r: uniform(r, 29, 64, 4, 16, perm=True,
                                       S=np.where(r.random((29, 64)) < 0.05, r.standard_normal((29, 64)), 0))),
    ("codebook 2/3/4 + csr", lambda r: codebook(r, 37, 90)),
    ("codebook 1/8", lambda r: codebook(r, 23, 41, widths=(1, 8), outliers=False)),
    ("additive 2x8 g8", lambda r: additive(r, 21, 48, 2, 8, 8)),
    ("additive 1x10 g6", lambda r: additive(r, 13, 36, 1, 10, 6)),            # LUT of 1024 entries
    ("additive 2x8 g8 two tiles", lambda r: additive(r, 19, 320, 2, 8, 8)),    # 80 positions: 64 + 16
    ("codebook 2 two tiles", lambda r: codebook(r, 21, 300, widths=(2,), outliers=False)),  # 75 bytes
    ("additive 1x16 g8 direct", lambda r: additive(r, 9, 528, 1, 16, 8)),     # 66 x 2^16 > LUT max
    ("row_lut 3 + csr", lambda r: rowlut(r, 23, 301, 3, outliers=True)),      # a chunk of 32 units + 6
    ("row_lut 4", lambda r: rowlut(r, 17, 199, 4)),      # 100 units: a chunk of 64 + 36, ends mid-unit
]


@pytest.mark.parametrize("name,build", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_dequantize(name, build):
    rng = np.random.default_rng(0)
    q = build(rng)
    W = q.dequantize()
    assert K.kernel_for(q, "cpu") == "cpu"
    for T in (1, 2, 4, 5, 11, 17):
        x = rng.standard_normal((T, q.shape[1])).astype(np.float32)
        y = matmul(q, x, "cpu")
        assert y.dtype == np.float32 and y.shape == (T, q.shape[0])
        assert rel(y, x @ W.T) <= TOL, (name, T, rel(y, x @ W.T))


def test_units_kernel_is_the_path_for_3_bits():
    """3-bit weights with groups of a multiple of 8 (or one group per row) decode row
    tiles for the BLAS path by units (8 codes per 3 bytes), not by the bit-extraction
    walk; a group size that splits a unit (20) falls back to it. Both against
    dequantize()."""
    import refq.kernels.cpu as kc
    rng = np.random.default_rng(12)
    for g, mode in ((128, "units"), (None, "units"), (24, "units"), (20, "bits")):
        q = uniform(rng, 9, 256, 3, g, perm=g == 128)
        assert kc._uniform_state(q)["mode"] == mode, g
        x = rng.standard_normal((3, 256)).astype(np.float32)
        assert rel(matmul(q, x), x @ q.dequantize().T) <= TOL


@pytest.mark.parametrize("bits,g,geometry", [
    (1, 128, (1, 8, np.uint8)), (2, 128, (2, 8, np.uint16)), (3, 128, (4, 8, np.uint32)),
    (4, None, (4, 8, np.uint32)), (5, 16, (8, 4, np.uint32)), (6, 8, (8, 4, np.uint32)),
    (7, 8, (8, 4, np.uint32)), (8, 64, (8, 4, np.uint32)), (3, 20, (4, 4, np.uint16)),
    (2, 6, (2, 2, np.uint8)), (3, 5, (4, 1, np.uint8))])
def test_lane_layout_holds_every_code(bits, g, geometry):
    """The lane kernels' repacked copy, read back code by code with the layout's
    definition (word w of row r in wl[r // 64, w, r % 64], code p of a word in bits
    [slot*p, slot*(p+1))), gives the codes that unpack() reads from qweight; padding
    rows and columns hold code 0. The geometry is the one lane_geometry documents."""
    import refq.kernels.cpu as kc
    rng = np.random.default_rng(bits)
    out, n = 70, 40
    q = uniform(rng, out, n, bits, g)
    G = q.scales.shape[1]
    assert kc.lane_geometry(bits, g or n, G) == geometry
    codes = q.codes()
    wl, slot, cpw = kc.lane_layout(codes, bits, g or n, G)
    assert (slot, cpw, wl.dtype) == geometry
    assert wl.shape[0] * kc.LANES >= out and wl.shape[1] * cpw >= n
    back = np.zeros((wl.shape[0] * kc.LANES, wl.shape[1] * cpw), np.int64)
    for r in range(back.shape[0]):
        for c in range(back.shape[1]):
            word = int(wl[r // kc.LANES, c // cpw, r % kc.LANES])
            back[r, c] = (word >> (slot * (c % cpw))) & ((1 << slot) - 1)
    assert np.array_equal(back[:out, :n], codes)
    assert not back[out:].any() and not back[:, n:].any()


def test_blas_path_and_small_path_agree(monkeypatch):
    rng = np.random.default_rng(1)
    for q in (uniform(rng, 300, 136, 4, 32, perm=True), uniform(rng, 40, 50, 3, 16),
              codebook(rng, 37, 90)):
        x = rng.standard_normal((20, q.shape[1])).astype(np.float32)
        ref = x @ q.dequantize().T
        monkeypatch.setattr(K, "TILE_FLOATS", 4000)          # several row tiles
        monkeypatch.setattr(K, "BLAS_MIN_BATCH", 8)
        assert rel(matmul(q, x), ref) <= TOL
        monkeypatch.setattr(K, "BLAS_MIN_BATCH", 10 ** 9)
        assert rel(matmul(q, x), ref) <= TOL


def test_lut_row_tiles_equal_dequantize_exactly():
    """The numba tile decoders of the codebook format (2/3/4 widths, 1/8, CSR) and
    of row_lut (SqueezeLLM, with CSR) are W_hat itself: each value is one stored
    table entry (+ one outlier)."""
    from refq.api import quantize_weight
    from refq.kernels.cpu import codebook_rows, row_lut_rows
    rng = np.random.default_rng(5)
    W0 = rng.standard_normal((19, 40)).astype(np.float32)
    X = rng.standard_normal((200, 40))
    sq = quantize_weight(W0, X.T @ X / 200, "squeezellm", bits=3, sensitive_frac=0.05)
    assert sq.outliers.nnz > 0
    for q, fn in ((codebook(rng, 37, 90), codebook_rows),
                  (codebook(rng, 23, 41, widths=(1, 8), outliers=False), codebook_rows),
                  (sq, row_lut_rows)):
        W = q.dequantize()
        for r0, r1 in ((0, q.shape[0]), (0, 1), (5, 17), (q.shape[0] - 3, q.shape[0])):
            assert np.array_equal(fn(q, r0, r1), W[r0:r1])


def test_uniform_row_tiles_equal_dequantize_exactly():
    """The uniform tile decoder (the BLAS path and prefill_weight) is W_hat itself,
    also with act-order (stored columns put back in place by the inverse perm) and
    rows that end inside a unit."""
    from refq.kernels.cpu import uniform_rows
    rng = np.random.default_rng(6)
    for q in (uniform(rng, 37, 160, 3, 32, perm=True), uniform(rng, 21, 77, 3, None, perm=True),
              uniform(rng, 30, 128, 2, 64, sym=True, perm=True), uniform(rng, 17, 100, 3, 32)):
        W = q.dequantize()
        for r0, r1 in ((0, q.shape[0]), (0, 1), (5, 17), (q.shape[0] - 3, q.shape[0])):
            assert np.array_equal(uniform_rows(q, r0, r1), W[r0:r1])


def test_integer_exact():
    """Identity input gives W_hat exactly; {0,1} codes with integer x sum exactly."""
    rng = np.random.default_rng(2)
    q = uniform(rng, 24, 64, 4, 16, perm=True)
    W = q.dequantize()
    for T in (1, 5, 16):
        eye = np.eye(64, dtype=np.float32)[:T]
        assert np.array_equal(matmul(q, eye), W[:, :T].T)
    codes = rng.integers(0, 2, (24, 64))
    qb = UniformWeight.from_codes(codes, np.ones((24, 4)), np.zeros((24, 4)), 2, 16, False)
    x = rng.integers(-8, 9, (3, 64)).astype(np.float32)
    assert np.array_equal(matmul(qb, x), x @ codes.T.astype(np.float32))
    qc = codebook(rng, 16, 40, outliers=False)
    eye = np.eye(40, dtype=np.float32)[:7]
    assert np.array_equal(matmul(qc, eye), qc.dequantize()[:, :7].T)


def test_kernel_really_reads_the_codes():
    """Changing one packed byte changes the kernel's output (no stale dense copy)."""
    rng = np.random.default_rng(3)
    q = uniform(rng, 16, 64, 4, 16)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    y0 = matmul(q, x)
    qw = q.qweight.copy()
    qw[5, 3] ^= 0xFF
    q.qweight = qw
    y1 = matmul(q, x)
    assert not np.array_equal(y0[0, 5], y1[0, 5]) and np.array_equal(y0[0, :5], y1[0, :5])
    assert q._dense is None


def test_input_shapes_and_dtypes():
    rng = np.random.default_rng(4)
    q = uniform(rng, 16, 64, 4, 16)
    W = q.dequantize()
    x = rng.standard_normal((2, 3, 64))
    y = q.matmul(x)                                           # float64, 3-D
    assert y.shape == (2, 3, 16) and y.dtype == np.float32
    assert rel(y, x.astype(np.float32) @ W.T) <= TOL
    x1 = rng.standard_normal(64).astype(np.float32)
    assert q.matmul(x1).shape == (16,)
    xs = rng.standard_normal((64, 4)).astype(np.float32).T    # non-contiguous
    assert rel(q.matmul(xs), xs @ W.T) <= TOL
    assert rel(q.matmul(x1.astype(np.float16)), x1.astype(np.float16).astype(np.float32) @ W.T) <= TOL


@pytest.mark.parametrize("x,msg", [
    (np.zeros((0, 64), np.float32), "batch 0"),
    (np.zeros((2, 63), np.float32), "63 features"),
    (np.zeros((2, 64), np.int32), "floating-point"),
    (np.zeros((2, 64), np.complex64), "floating-point"),
    (np.float32(1.0), "at least one dimension"),
])
def test_bad_input(x, msg):
    q = uniform(np.random.default_rng(5), 16, 64, 4, 16)
    with pytest.raises(RefqError, match=msg):
        q.matmul(x)


def test_bad_packed_tensors():
    q = uniform(np.random.default_rng(6), 16, 64, 4, 16)
    x = np.ones((1, 64), np.float32)
    q.qweight = q.qweight[:, :-1]                              # wrong packed shape
    with pytest.raises(RefqError, match="qweight"):
        q.matmul(x)
    q = uniform(np.random.default_rng(6), 16, 64, 4, 16)
    q.scales = q.scales.astype(np.float32)                     # wrong dtype
    with pytest.raises(RefqError, match="scales"):
        q.matmul(x)
    with pytest.raises(RefqError, match="kernel"):
        q.matmul(x, kernel="tpu")


def test_gpu_kernel_without_gpu_is_one_line_error():
    try:
        from refq.kernels.gpu import require_gpu
        require_gpu()
    except RefqError as e:
        assert "\n" not in str(e) and "--kernel gpu" in str(e)
        q = uniform(np.random.default_rng(7), 16, 64, 4, 16)
        with pytest.raises(RefqError, match="--kernel gpu"):
            q.matmul(np.ones((1, 64), np.float32), kernel="gpu")
    else:
        pytest.skip("a GPU is present")


def test_dequant_kernel_caches_and_matches():
    rng = np.random.default_rng(8)
    q = uniform(rng, 16, 64, 4, 16)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(q.matmul(x, kernel="dequant"), x @ q.dequantize().T)
    assert q._dense is not None


THREADS_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {repo!r})
import numba
import refq.kernels.cpu as kc
from test_kernels_cpu import CASES
kc.PAR_MIN_WORK = 0          # the parallel kernels even for these small products
kc.TILED_MIN_ROWS = 1        # and one block of rows per thread in the tiled LUT kernel
out = []
for name, build in CASES:
    q = build(np.random.default_rng(0))
    for T in (1, 6):
        x = np.random.default_rng(T).standard_normal((T, q.shape[1])).astype(np.float32)
        out.append(q.matmul(x))
np.save(sys.argv[1], np.concatenate([o.ravel() for o in out]))
print(numba.get_num_threads())
"""


def test_bit_identical_with_1_and_2_threads(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(THREADS_SCRIPT.format(repo=REPO))
    res = []
    for nt in (1, 2):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(nt), OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
        p = subprocess.run([sys.executable, str(script), str(tmp_path / f"y{nt}.npy")],
                           env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.strip() == str(nt)
        res.append(np.load(tmp_path / f"y{nt}.npy"))
    assert res[0].tobytes() == res[1].tobytes()


def test_codebook_every_width():
    """Byte tables at every width 1..8 (digit bytes of 8/4/2/1 codes at 1/2/4/8 bits, 2 codes
    at 3 bits, 1 at 5-7), odd column counts per width, one token and five, against
    dequantize(); and digit_codes against the codes packed independently."""
    import refq.kernels.cpu as kc
    rng = np.random.default_rng(11)
    q = codebook(rng, 29, 161, widths=tuple(range(1, 9)))
    W = q.dequantize()
    for T in (1, 5):
        x = rng.standard_normal((T, 161)).astype(np.float32)
        assert rel(matmul(q, x, "cpu"), x @ W.T) <= TOL
    codes = q.codes()
    for b in range(1, 9):
        cols = q.columns(b)
        d = kc.digit_codes(np.ascontiguousarray(q.qweights[b]), b, cols.size)
        cpb = 8 // b
        for k in range(cols.size):                     # code k is digit k % cpb of byte k // cpb
            assert np.array_equal((d[:, k // cpb] >> (b * (k % cpb))) & (2 ** b - 1), codes[:, cols[k]])


def test_tiled_lut_kernel_does_not_depend_on_the_row_blocks():
    """The tiled LUT kernel (AQLM, CLAQ byte tables) gives each thread one block of rows;
    the per-row sum order is fixed, so any split (1 row, 7 rows, all rows per block) must
    give the same bits. 2x8 g8 over 136 inputs: 34 positions, one tile of 64 with 30 padded."""
    import refq.kernels.cpu as kc
    rng = np.random.default_rng(5)
    q = additive(rng, 45, 136, 2, 8, 8)
    st = kc._additive_state(q)
    T = 3
    x = rng.standard_normal((T, 136)).astype(np.float32)
    lut = kc.additive_table(x, st["C"], st["codes"].shape[0] * kc.LUT_TILE)
    ys = []
    for rows in (1, 7, 45, 1000):
        y = np.zeros((T, 45), np.float32)
        kc._tiled_lut(256)(st["codes"], lut.reshape(T, -1), y, rows)
        ys.append(y * st["s"])
    assert all(y.tobytes() == ys[0].tobytes() for y in ys)
    assert rel(ys[0], x @ q.dequantize().T) <= TOL


@pytest.mark.parametrize("bits", range(1, 9))
def test_row_lut_every_width(bits):
    """The unit-chunk row_lut kernel at every width (units of 1, 3, 5 and 7 bytes; rows ending
    inside a unit; whole chunks and a last shorter one; one token and four at once) against
    dequantize()."""
    rng = np.random.default_rng(bits)
    for n in (13, 8 * 32 * 2 + 5):
        q = rowlut(rng, 11, n, bits)
        W = q.dequantize()
        for T in (1, 5):                                     # 5: four tokens at once, then one
            x = rng.standard_normal((T, n)).astype(np.float32)
            assert rel(matmul(q, x, "cpu"), x @ W.T) <= TOL, (bits, n, T)


def test_additive_direct_kernel(monkeypatch):
    """The direct AQLM kernel (no LUT), forced for every weight, at several (M, g)."""
    import refq.kernels.cpu as kc
    monkeypatch.setattr(kc, "ADDITIVE_LUT_MAX", 0)
    rng = np.random.default_rng(13)
    for M, B, g, n in ((2, 8, 8, 48), (1, 10, 6, 36), (3, 4, 4, 44)):
        q = additive(rng, 15, n, M, B, g)
        assert not kc._additive_state(q)["lut"]
        for T in (1, 3):
            x = rng.standard_normal((T, n)).astype(np.float32)
            assert rel(matmul(q, x, "cpu"), x @ q.dequantize().T) <= TOL, (M, g, T)


def test_row_lut_and_spqr():
    rng = np.random.default_rng(9)
    out, n = 23, 50
    S = np.where(rng.random((out, n)) < 0.05, rng.standard_normal((out, n)), 0)
    q = RowLutWeight.from_codes(rng.integers(0, 8, (out, n)), np.sort(rng.standard_normal((out, 8)), 1), 3, S=S)
    W = q.dequantize()
    for T in (1, 5):
        x = rng.standard_normal((T, n)).astype(np.float32)
        assert rel(matmul(q, x), x @ W.T) <= TOL
    assert K.kernel_for(q, "cpu") == "cpu"
    try:
        from refq.methods import spqr  # noqa: F401
        from refq.api import quantize_weight
    except ImportError:
        pytest.skip("spqr method not available")
    Wd = rng.standard_normal((40, 64)).astype(np.float32)
    X = rng.standard_normal((256, 64))
    try:
        qs = quantize_weight(Wd, X.T @ X / 256, "spqr", bits=3, group_size=16)
    except Exception as e:  # the method's options may differ while it is being written
        pytest.skip(f"spqr not quantizable here: {e}")
    if qs.FORMAT != "spqr":
        pytest.skip("spqr wrote another format")
    Wq = qs.dequantize()
    for T in (1, 3, 20):
        x = rng.standard_normal((T, 64)).astype(np.float32)
        assert rel(matmul(qs, x), x @ Wq.T) <= TOL


def test_float_lane_loop_asks_for_512_bit_vectors():
    """The float lane kernel's block function carries LLVM's "prefer-vector-width"="512"
    (refq.kernels.cpu.prefer_vector_width): read back from the LLVM IR numba generated,
    and, where numba compiles for AVX-512, from the assembly (zmm registers in its FMAs;
    LLVM's tuning for Intel AVX-512 CPUs gives ymm without the hint). Fails if llvmlite
    stops accepting the attribute (the hint is then skipped silently)."""
    import re
    import llvmlite.binding as llvm
    import refq.kernels.cpu as kc
    rng = np.random.default_rng(0)
    q = uniform(rng, 64, 256, 4, 128)
    matmul(q, rng.standard_normal((1, 256)).astype(np.float32), "cpu")
    st = kc._uniform_state(q)
    fn = kc._uniform_lanes(st["lanes"]["slot"], st["lanes"]["cpw"]).block_functions["float"]
    assert '"prefer-vector-width"="512"' in "\n".join(fn.inspect_llvm().values())
    feats = os.environ.get("NUMBA_CPU_FEATURES") or llvm.get_host_cpu_features().flatten()
    if "+avx512f" in feats.split(","):
        asm = "\n".join(fn.inspect_asm().values())
        assert re.search(r"vfmadd\w*ps\s[^\n]*%zmm", asm)
