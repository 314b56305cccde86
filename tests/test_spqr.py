"""SpQR (refq/methods/spqr.py, refq/formats/spqr.py): equal to GPTQ without
outliers and second-level quantization, the outlier criterion by hand, the
threshold's effect, bilevel scales against brute force, bits by hand."""

import math

import numpy as np
import pytest

from refq.api import layer_loss, load_quantized, quantize_weight
from refq.errors import RefqError
from refq.methods.spqr import quantize_stat


def correlated_problem(out, n, seed, tokens=400):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)).astype(np.float32)
    mix = rng.standard_normal((n, n)) * 0.6 + np.eye(n)
    X = rng.standard_normal((tokens, n)) @ mix * rng.uniform(0.2, 3.0, size=n)
    return W, X.T @ X / tokens


def heavy_tailed(out, n, seed):
    W, H = correlated_problem(out, n, seed)
    rng = np.random.default_rng(seed + 1)
    W = (W * np.exp(rng.standard_normal(W.shape))).astype(np.float32)   # a few large weights
    return W, H


@pytest.mark.parametrize("kw", [dict(bits=3, group_size=16), dict(bits=4, group_size=8, sym=True),
                                dict(bits=2, group_size=16, act_order=False),
                                dict(bits=3, group_size=48, percdamp=0.1)])
def test_no_outliers_fp16_scales_equals_gptq(kw):
    W, H = correlated_problem(20, 96, seed=1)
    act = kw.pop("act_order", True)
    s = quantize_weight(W, H, "spqr", outlier_threshold=math.inf, qq_bits=None, act_order=act, **kw)
    g = quantize_weight(W, H, "gptq", act_order=act, **kw)
    assert s.outliers.nnz == 0
    np.testing.assert_array_equal(s.codes(), g.codes())
    np.testing.assert_array_equal(s.scales(), g.scales.astype(np.float32))
    np.testing.assert_array_equal(s.zeros(), g.zeros())
    np.testing.assert_array_equal(s.dequantize(), g.dequantize())
    assert s.info["loss"] == g.info["loss"]
    # same stored bits too (scales fp16, b-bit zeros, perm)
    assert s.bits_per_weight == g.bits_per_weight


def test_outlier_criterion_by_hand_diagonal_hessian():
    # diagonal H: GPTQ compensates nothing, U = diag(1/sqrt(H_jj + damp)), so
    # without leave-one-out the grid is RTN's (groups of 8) and the outliers are
    # exactly the weights with ((w - q(w)) / U_jj)² > τ mean_j(var_r(W_j) / U_jj²)
    rng = np.random.default_rng(2)
    W = rng.standard_normal((12, 32)).astype(np.float32)
    d = rng.uniform(0.5, 4, 32)
    H = np.diag(d)
    tau = 0.05
    q = quantize_weight(W, H, "spqr", bits=3, group_size=8, qq_bits=None, act_order=False,
                        leave_one_out=False, outlier_threshold=tau)
    r = quantize_weight(W, None, "rtn", bits=3, group_size=8)
    np.testing.assert_array_equal(q.codes(), r.codes())
    Ud = 1 / np.sqrt(d + 0.01 * d.mean())
    err = ((W - r.dequantize()) / Ud) ** 2
    thr = tau * np.mean(np.var(W.astype(np.float64), axis=0, ddof=1) / Ud ** 2)
    expect = err > thr
    assert 0 < expect.sum() < expect.size
    np.testing.assert_array_equal(q.outliers.to_dense() != 0, expect)
    # outliers are kept: W_hat = q(w) + fp16(w - q(w))
    keep = (r.dequantize().astype(np.float64) + (W - r.dequantize()).astype(np.float16))[expect]
    np.testing.assert_array_equal(q.dequantize()[expect], keep.astype(np.float32))


def test_outlier_count_responds_to_threshold():
    W, H = heavy_tailed(32, 64, seed=3)
    counts, losses = [], []
    for tau in (0.02, 0.1, 0.5, 2.0, math.inf):
        q = quantize_weight(W, H, "spqr", bits=3, outlier_threshold=tau)
        counts.append(q.outliers.nnz)
        losses.append(q.info["loss"])
    # lower threshold -> more outliers -> lower loss (documented: the count
    # falls as τ grows, none at τ = inf)
    assert counts[-1] == 0
    assert all(a > b for a, b in zip(counts, counts[1:])), counts
    assert all(a < b for a, b in zip(losses, losses[1:])), losses


def test_leave_one_out_fits_the_grid_without_the_outlier():
    W, _ = correlated_problem(8, 32, seed=4)
    H = np.diag(np.random.default_rng(4).uniform(0.5, 2, 32))  # diagonal: the grid alone decides
    W[2, 5] = 30.0                                            # far outside its group's range
    kw = dict(bits=3, group_size=8, qq_bits=None, act_order=False, outlier_threshold=0.2)
    loo = quantize_weight(W, H, "spqr", leave_one_out=True, **kw)
    raw = quantize_weight(W, H, "spqr", leave_one_out=False, **kw)
    assert loo.outliers.to_dense()[2, 5] != 0
    # group 0 of row 2: the grid without the outlier is ~10x finer
    assert loo.scales()[2, 0] < 0.2 * raw.scales()[2, 0]
    row = [layer_loss(W[2:3], q.dequantize()[2:3], H) for q in (loo, raw)]
    assert row[0] < 0.5 * row[1]


def brute_scale_levels(scale, lo, step, qq_bits):
    levels = (np.float32(lo) + np.float32(step) * np.arange(2 ** qq_bits, dtype=np.float32))
    return levels[np.argmin(np.abs(levels[None, :].astype(np.float64) - scale[:, None]), axis=1)]


def test_bilevel_scales_are_nearest_levels():
    rng = np.random.default_rng(5)
    scale = rng.uniform(0.01, 0.3, 40)
    codes, lo, step, hat = quantize_stat(scale, 3, 16)       # blocks of 16, 16, 8 rows
    assert lo.shape == step.shape == (3,)
    for b in range(3):
        rows = slice(16 * b, 16 * b + 16)
        assert lo[b] == np.float16(scale[rows].min())
        assert step[b] == np.float16((scale[rows].max() - float(lo[b])) / 7)
        np.testing.assert_array_equal(hat[rows].astype(np.float32),
                                      brute_scale_levels(scale[rows], lo[b], step[b], 3))
    assert np.all(hat > 0)


def test_bilevel_grid_by_hand_identity_hessian():
    # H = I: GPTQ compensates nothing, so every group's grid and every code can
    # be written down: scale = (max - min)/maxq and zero = maxq/2 - (min + max)/(2 scale_hat),
    # each quantized over blocks of qg rows; code = clamp(round(w/scale_hat + zero_hat))
    W, _ = correlated_problem(12, 32, seed=6)
    W64 = W.astype(np.float64)
    q = quantize_weight(W, np.eye(32), "spqr", bits=3, group_size=8, qq_bits=3, qq_group_size=4,
                        outlier_threshold=math.inf, act_order=False)
    codes = np.empty((12, 32))
    for j in range(4):
        x = W64[:, 8 * j:8 * j + 8]
        lo, hi = x.min(1), x.max(1)
        s_hat = quantize_stat((hi - lo) / 7, 3, 4)[3]
        z_hat = quantize_stat(3.5 - (lo + hi) / (2 * s_hat), 3, 4)[3]
        np.testing.assert_array_equal(q.scales()[:, j], s_hat.astype(np.float32))
        np.testing.assert_array_equal(q.zeros()[:, j], z_hat.astype(np.float32))
        codes[:, 8 * j:8 * j + 8] = np.clip(np.rint(x / s_hat[:, None] + z_hat[:, None]), 0, 7)
    np.testing.assert_array_equal(q.codes(), codes)
    # the real zero is not an integer in general: the bilevel grid is not GPTQ's
    assert np.any(q.zeros() != np.round(q.zeros()))


def test_nearly_constant_row_far_from_zero_stays_finite():
    """A group row whose range is far below float16's resolution of its centre
    (found on SmolLM2 layer 3 gate_proj at 2 bits) once needed a zero of ~1e5,
    beyond float16: the stored second level became inf and packing failed.
    The row's range is now widened to |centre| maxq 2^-11, so the zero fits."""
    from refq.methods.spqr import fit_group
    rng = np.random.default_rng(3)
    X = rng.standard_normal((16, 16)) * 0.1
    X[5] = 0.03 + 1e-9 * np.arange(16)                       # range 1.5e-8, centre 0.03
    scale, zero, _ = fit_group(X, 2, False, 3, 16)
    assert np.isfinite(scale).all() and np.isfinite(zero).all()
    assert abs(zero[5]) < 2 ** 12
    W_hat5 = scale[5] * (np.clip(np.rint(X[5] / scale[5] + zero[5]), 0, 3) - zero[5])
    assert np.abs(W_hat5 - X[5]).max() <= 0.03 * 2 ** -8     # the row is still represented
    q = quantize_weight(np.vstack([X, X]), np.eye(16), "spqr", bits=2, outlier_threshold=math.inf)
    assert np.isfinite(q.dequantize()).all()
    s = quantize_stat(np.array([1e6, -1e6, 1.0, 2.0]), 3, 4)   # beyond float16: saturated
    assert np.isfinite(s[1]).all() and np.isfinite(s[2]).all() and s[0].max() <= 7


def test_bits_per_weight_hand_count():
    W, H = heavy_tailed(40, 64, seed=7)
    q = quantize_weight(W, H, "spqr", bits=3, group_size=16, qq_bits=3, qq_group_size=16)
    out, n, b, g, qq, qg = 40, 64, 3, 16, 3, 16
    G, R = n // g, math.ceil(out / qg)
    nnz = q.outliers.nnz
    assert nnz > 0
    bits = (out * math.ceil(n * b / 8) * 8          # codes, rows packed
            + math.ceil(out * G * qq / 8) * 8       # scale codes, one stream
            + 2 * 16 * R * G                        # lo, step fp16
            + math.ceil(out * G * qq / 8) * 8       # zero codes, one stream
            + 2 * 16 * R * G                        # their lo, step fp16
            + 16 * n                                # perm uint16
            + 32 * (out + 1) + 32 * nnz)            # CSR: rowptr int32, cols uint16 + values fp16
    assert q.bits_per_weight == pytest.approx(bits / (out * n), rel=1e-15)
    assert sum(q.bits_breakdown.values()) == pytest.approx(q.bits_per_weight, rel=1e-12)
    assert q.bits_breakdown["outliers"] == pytest.approx(32 * (out + 1 + nnz) / (out * n))


def test_round_trip_and_loss():
    W, H = heavy_tailed(24, 48, seed=8)
    q = quantize_weight(W, H, "spqr", bits=3, group_size=16, qq_group_size=8)
    back = load_quantized(q.tensors(), q.meta())
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())
    assert q.info["loss"] == pytest.approx(layer_loss(W, q.dequantize(), H), rel=1e-12)
    g = quantize_weight(W, H, "gptq", bits=3, group_size=16, act_order=True)
    assert q.info["loss"] < g.info["loss"]                   # outliers pay off here


def test_deterministic():
    W, H = heavy_tailed(16, 32, seed=9)
    a = quantize_weight(W, H, "spqr", group_size=8)
    b = quantize_weight(W, H, "spqr", group_size=8)
    for k in a.tensors():
        np.testing.assert_array_equal(a.tensors()[k], b.tensors()[k])


@pytest.mark.parametrize("opt, value, match", [
    ("outlier_threshold", 0, "outlier_threshold"), ("outlier_threshold", -1.0, "outlier_threshold"),
    ("qq_bits", 0, "qq_bits"), ("qq_bits", 9, "qq_bits"), ("qq_group_size", 0, "qq_group_size"),
    ("group_size", None, "group_size"), ("leave_one_out", 1, "leave_one_out"),
    ("group_size", 12, "group_size 12 does not divide in_features 32"),
])
def test_option_errors(opt, value, match):
    with pytest.raises(RefqError, match=match) as e:
        quantize_weight(np.ones((2, 32), np.float32), np.eye(32), "spqr", **{opt: value})
    assert "\n" not in str(e.value)
