"""RTN min-max quantizer: hand-worked values, an independent per-row reference,
groups (incl. ragged), sym/asym, and the mse clipping search."""

import numpy as np
import pytest

from refq.api import quantize_weight


def q(W, **kw):
    return quantize_weight(np.asarray(W, dtype=np.float32), None, "rtn", **kw)


# ---------------------------------------------------------------------------
# independent reference: one row, plain Python, GPTQ quant.py conventions
# (+ refq's float16 scale rounding)
# ---------------------------------------------------------------------------
def ref_grid(xmin, xmax, bits, sym):
    maxq = 2 ** bits - 1
    scale = float(np.float16((xmax - xmin) / maxq))
    zero = (maxq + 1) / 2 if sym else min(max(round(-xmin / scale), 0), maxq)  # round: half-even
    return scale, zero


def ref_quant_row(row, bits, sym, mse=False):
    maxq = 2 ** bits - 1
    xmin, xmax = min(min(row), 0.0), max(max(row), 0.0)
    if sym:
        xmax = max(abs(xmin), xmax)
        if xmin < 0:
            xmin = -xmax
    if xmin == 0 and xmax == 0:
        xmin, xmax = -1.0, 1.0

    def codes_for(scale, zero):
        return [min(max(round(w / scale) + zero, 0), maxq) for w in row]

    def err(scale, zero):
        return sum(abs(scale * (c - zero) - w) ** 2.4 for c, w in zip(codes_for(scale, zero), row))

    scale, zero = ref_grid(xmin, xmax, bits, sym)
    if mse:
        best = float("inf")
        for i in range(80):
            p = 1 - i / 100
            s1, z1 = ref_grid(p * xmin, p * xmax, bits, sym)
            e = err(s1, z1)
            if e < best:
                best, scale, zero = e, s1, z1
    return codes_for(scale, zero), scale, zero


def ref_rtn(W, bits, group_size, sym, mse=False):
    W = np.asarray(W, dtype=np.float64)
    out, n = W.shape
    g = group_size or n
    deq = np.zeros_like(W)
    codes = np.zeros(W.shape, dtype=np.int64)
    for r in range(out):
        for c0 in range(0, n, g):
            cs, s, z = ref_quant_row([float(v) for v in W[r, c0:c0 + g]], bits, sym, mse)
            codes[r, c0:c0 + g] = cs
            deq[r, c0:c0 + g] = [s * (c - z) for c in cs]
    return codes, deq


# ---------------------------------------------------------------------------
def test_hand_worked_asym_2bit():
    W = [[-1.0, 0.5, 2.0, 0.25],   # xmin -1, xmax 2: scale 1, zero 1
         [0.3, 0.6, 0.9, 1.5],     # xmin clamped to 0: scale 0.5, zero 0
         [0.0, 0.0, 0.0, 0.0]]     # all zero: range (-1, 1)
    qw = q(W, bits=2)
    # row 0: round(-1)+1=0, round(0.5)=0 (half to even)+1=1, 2+1=3, round(.25)+1=1
    # row 1: round(0.6)=1, round(1.2)=1, round(1.8)=2, round(3)=3
    np.testing.assert_array_equal(qw.codes()[:2], [[0, 1, 3, 1], [1, 1, 2, 3]])
    np.testing.assert_array_equal(qw.dequantize()[:2], [[-1, 0, 2, 0], [0.5, 0.5, 1.0, 1.5]])
    np.testing.assert_array_equal(qw.dequantize()[2], 0)
    np.testing.assert_array_equal(qw.scales[:2, 0].astype(float), [1.0, 0.5])
    np.testing.assert_array_equal(qw.zeros()[:, 0], [1, 0, 2])


def test_hand_worked_sym_2bit():
    # xmax = 3, xmin = -3: scale = 6/3 = 2, zero = (3+1)/2 = 2 -> grid {-4, -2, 0, 2}
    # -3/2 = -1.5 -> -2 (half to even) -> 0; 0.55 -> 1 -> 3; 1.45 -> 1 -> 3; -0.45 -> 0 -> 2
    qw = q([[-3.0, 1.1, 2.9, -0.9]], bits=2, sym=True)
    np.testing.assert_array_equal(qw.codes(), [[0, 3, 3, 2]])
    np.testing.assert_array_equal(qw.dequantize(), [[-4, 2, 2, 0]])
    assert "qzeros" not in qw.tensors()


def test_sym_row_without_negatives_follows_gptq():
    # GPTQ's quant.py keeps xmin = 0 for such a row: scale = xmax / maxq with
    # zero 2^(b-1), so the top of the row clips at (maxq - zero) * scale.
    qw = q([[0.5, 1.0]], bits=2, sym=True)
    s = float(np.float16(1.0 / 3))
    np.testing.assert_array_equal(qw.codes(), [[3, 3]])
    np.testing.assert_allclose(qw.dequantize(), [[s, s]], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [None, 4, 7, 16])
def test_against_reference(bits, sym, group_size):
    rng = np.random.default_rng(bits + 10 * sym + (group_size or 0))
    W = rng.standard_normal((6, 23)).astype(np.float32)
    W[2] = np.abs(W[2])           # a row with no negative weight
    W[3, :8] = 0                   # an all-zero group
    qw = q(W, bits=bits, sym=sym, group_size=group_size)
    codes, deq = ref_rtn(W, bits, group_size, sym)
    np.testing.assert_array_equal(qw.codes(), codes)
    np.testing.assert_array_equal(qw.dequantize(), deq.astype(np.float32))
    G = -(-23 // (group_size or 23))
    assert qw.scales.shape == (6, G)


def test_ragged_group_equals_separate_quantization():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 10)).astype(np.float32)
    deq = q(W, bits=3, group_size=4).dequantize()
    for c0, c1 in [(0, 4), (4, 8), (8, 10)]:
        np.testing.assert_array_equal(deq[:, c0:c1], q(W[:, c0:c1], bits=3).dequantize())


def test_dequant_error_within_half_step():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((8, 64)).astype(np.float32)
    qw = q(W, bits=4, group_size=16)
    s = np.repeat(qw.scales.astype(np.float64), 16, axis=1)
    assert np.all(np.abs(qw.dequantize() - W) <= s / 2 * (1 + 1e-3))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_mse_never_worse_and_matches_reference(sym, group_size):
    rng = np.random.default_rng(3)
    W = rng.standard_t(df=2, size=(10, 24)).astype(np.float32)   # heavy tails: clipping helps
    plain = q(W, bits=3, sym=sym, group_size=group_size).dequantize().astype(np.float64)
    mse = q(W, bits=3, sym=sym, group_size=group_size, mse=True).dequantize().astype(np.float64)
    g = group_size or 24
    for c0 in range(0, 24, g):
        e_plain = np.sum(np.abs(plain[:, c0:c0 + g] - W[:, c0:c0 + g]) ** 2.4, axis=1)
        e_mse = np.sum(np.abs(mse[:, c0:c0 + g] - W[:, c0:c0 + g]) ** 2.4, axis=1)
        assert np.all(e_mse <= e_plain * (1 + 1e-12))
    assert np.sum(np.abs(mse - W) ** 2.4) < np.sum(np.abs(plain - W) ** 2.4)
    _, deq = ref_rtn(W, 3, group_size, sym, mse=True)
    np.testing.assert_array_equal(mse.astype(np.float32), deq.astype(np.float32))
