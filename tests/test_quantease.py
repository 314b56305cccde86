"""QuantEase (refq/methods/quantease.py): monotone descent, the coordinate
update against brute force over the grid, never worse than its GPTQ start,
the outlier variant (IHT) and its storage, option errors."""

import numpy as np
import pytest

from refq.api import layer_loss, load_quantized, quantize_weight
from refq.errors import RefqError


def correlated_problem(out, n, seed, tokens=400):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)).astype(np.float32)
    mix = rng.standard_normal((n, n)) * 0.6 + np.eye(n)
    X = rng.standard_normal((tokens, n)) @ mix * rng.uniform(0.2, 3.0, size=n)
    return W, X.T @ X / tokens


def assert_monotone(trace):
    trace = np.asarray(trace)
    assert np.all(np.diff(trace) <= 1e-12 * trace[0]), np.diff(trace).max()


CONFIGS = [
    dict(bits=3, init="rtn", act_order=False),
    dict(bits=2, init="rtn", group_size=8),
    dict(bits=3, init="gptq", group_size=8),                     # act_order: perm stored
    dict(bits=4, init="gptq", sym=True, act_order=False),
    dict(bits=3, init="rtn", group_size=8, outlier_frac=0.02),
    dict(bits=2, init="gptq", outlier_frac=0.05, act_order=False),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_no_sweep_increases_the_loss(kw):
    W, H = correlated_problem(16, 40, seed=3)
    qw = quantize_weight(W, H, "quantease", iters=8, **kw)
    trace = qw.info["loss_trace"]
    assert len(trace) >= 2
    assert_monotone(trace)
    # the trace's last value is the loss of what is stored
    assert layer_loss(W, qw.dequantize(), H) == pytest.approx(trace[-1], rel=1e-9)
    assert qw.info["loss"] == pytest.approx(trace[-1], rel=1e-9)


def brute_force_sweep(W, H, What, scales, zeros, maxq, order):
    """One Gauss-Seidel pass: each entry (r, j) in column order set to the grid
    value minimising the FULL loss with everything else fixed (no formula)."""
    What = What.copy()
    grid = np.arange(maxq + 1)
    for j in order:
        for r in range(W.shape[0]):
            best, arg = np.inf, None
            for q in grid:
                What[r, j] = scales[r] * (q - zeros[r])
                e = W[r] - What[r]
                f = e @ H @ e
                if f < best:
                    best, arg = f, What[r, j]
            What[r, j] = arg
    return What


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coordinate_update_equals_brute_force(seed):
    # per-channel grid fixed by RTN; one and two sweeps against brute force
    from refq.methods.rtn import find_params, quantize_codes
    W, H = correlated_problem(4, 7, seed=seed, tokens=30)
    bits = 2
    s, z = find_params(W.astype(np.float64), bits)
    What = s[:, None] * (quantize_codes(W.astype(np.float64), s, z, 3) - z[:, None])
    for sweeps in (1, 2):
        ref = What
        for _ in range(sweeps):
            ref = brute_force_sweep(W.astype(np.float64), H, ref, s, z, 3, range(7))
        qw = quantize_weight(W, H, "quantease", bits=bits, init="rtn", act_order=False, iters=sweeps)
        np.testing.assert_array_equal(qw.dequantize(), ref.astype(np.float32))


def test_single_column_problem_equals_brute_force_over_grid():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((9, 1)).astype(np.float32)
    H = np.array([[2.5]])
    qw = quantize_weight(W, H, "quantease", bits=3, init="rtn", iters=3)
    s = qw.scales.astype(np.float64)[:, 0]
    z = qw.zeros().astype(np.float64)[:, 0]
    grid = s[:, None] * (np.arange(8)[None, :] - z[:, None])           # (9, 8)
    loss = 2.5 * (W.astype(np.float64) - grid) ** 2
    best = grid[np.arange(9), loss.argmin(1)]
    np.testing.assert_array_equal(qw.dequantize()[:, 0], best.astype(np.float32))


def test_sign_of_the_update_two_columns():
    # inputs 0 and 1 perfectly correlated (x0 = x1): only w0 + w1 matters.
    # Row [0.3, 0.3, 1, -1], sym 2 bits: scale 2/3, grid {-4/3, -2/3, 0, 2/3};
    # RTN gives (0, 0), error sum 0.6.  Column 0: ũ = 0.3 + (0.3 - 0) = 0.6 -> 2/3
    # (a minus sign would give ũ = 0 and no change); column 1: ũ = 0.3 + (0.3 - 2/3)
    # = -0.067 -> 0.  Error sum 0.3 + 0.3 - 2/3 = -1/15.
    W = np.array([[0.3, 0.3, 1.0, -1.0]], np.float32)
    H = np.zeros((4, 4)); H[:2, :2] = 1.0; H[2, 2] = H[3, 3] = 1.0
    qw = quantize_weight(W, H, "quantease", bits=2, sym=True, init="rtn", act_order=False, iters=2)
    deq = qw.dequantize()[0]
    s = np.float32(np.float16(2 / 3))
    np.testing.assert_array_equal(deq, [s, 0, s, -2 * s])
    assert qw.info["loss_trace"][-1] < qw.info["loss_trace"][0]


@pytest.mark.parametrize("kw", [dict(), dict(group_size=8), dict(bits=2, group_size=16, sym=True),
                                dict(act_order=False, group_size=8), dict(bits=4, mse=True)])
def test_from_gptq_never_worse_than_gptq(kw):
    W, H = correlated_problem(24, 48, seed=9, tokens=600)
    bits = kw.pop("bits", 3)
    act = kw.pop("act_order", True)
    g = quantize_weight(W, H, "gptq", bits=bits, act_order=act, **kw)
    q = quantize_weight(W, H, "quantease", bits=bits, act_order=act, init="gptq", **kw)
    assert q.info["loss_trace"][0] == pytest.approx(g.info["loss"], rel=1e-12)
    assert q.info["loss"] <= g.info["loss"] * (1 + 1e-12)
    assert q.info["loss"] < 0.99 * g.info["loss"]                       # and it does improve here
    assert q.FORMAT == "uniform"
    # same grids as GPTQ: only the codes move
    np.testing.assert_array_equal(q.scales, g.scales)
    if g.perm is not None:
        np.testing.assert_array_equal(q.perm, g.perm)


def test_outliers_stored_counted_and_round_trip():
    W, H = correlated_problem(16, 40, seed=5)
    W[3, 7] = 25.0                                                      # a gross outlier
    frac = 0.02
    qw = quantize_weight(W, H, "quantease", bits=3, group_size=8, outlier_frac=frac, iters=6)
    k = round(frac * W.size)
    assert qw.FORMAT == "uniform_sparse"
    assert 0 < qw.outliers.nnz <= k
    assert qw.info["outliers"] == qw.outliers.nnz
    S = qw.outliers.to_dense()
    assert S[3, 7] != 0                                                 # it is in S
    # W_hat = dense + S exactly
    np.testing.assert_array_equal(qw.dequantize(), super(type(qw), qw).dequantize() + S)
    # bits by hand: uniform fields + 32 per outlier + 32 per row pointer
    base = quantize_weight(W, H, "quantease", bits=3, group_size=8, iters=1)
    dense_bytes = sum(t.nbytes for t in base.tensors().values())
    assert qw.bits_per_weight == pytest.approx(
        (8 * dense_bytes + 32 * qw.outliers.nnz + 32 * (16 + 1)) / W.size, rel=1e-12)
    assert qw.bits_breakdown["outliers"] == pytest.approx(
        (32 * qw.outliers.nnz + 32 * 17) / W.size, rel=1e-12)
    back = load_quantized(qw.tensors(), qw.meta())
    np.testing.assert_array_equal(back.dequantize(), qw.dequantize())
    # outliers help a lot on this layer
    plain = quantize_weight(W, H, "quantease", bits=3, group_size=8, iters=6)
    assert qw.info["loss"] < 0.7 * plain.info["loss"]


def test_iht_step_closed_form_identity_hessian():
    # H = I: λ_max = 1 and f = ‖W - Ŵ - S‖²; the first IHT step from S0 is
    # S1 = top_k(S0 + (W - Ŵ - S0)) = top_k(W - Ŵ): the k largest residuals
    rng = np.random.default_rng(6)
    W = rng.standard_normal((6, 10)).astype(np.float32)
    W[0, 0], W[2, 5] = 9.0, -7.0
    k = 3
    qw = quantize_weight(W, np.eye(10), "quantease", bits=2, init="rtn", act_order=False,
                         outlier_frac=k / 60, iters=1)
    dense = super(type(qw), qw).dequantize().astype(np.float64)
    resid = W - dense
    top = np.argsort(-np.abs(resid).ravel(), kind="stable")[:k]
    expect = np.zeros(60)
    expect[top] = resid.ravel()[top]
    np.testing.assert_array_equal(qw.outliers.to_dense().ravel(),
                                  expect.astype(np.float16).astype(np.float32))


def test_deterministic():
    W, H = correlated_problem(9, 30, seed=13)
    a = quantize_weight(W, H, "quantease", group_size=8, outlier_frac=0.01, iters=4)
    b = quantize_weight(W, H, "quantease", group_size=8, outlier_frac=0.01, iters=4)
    for k in a.tensors():
        np.testing.assert_array_equal(a.tensors()[k], b.tensors()[k])


@pytest.mark.parametrize("opt, value, match", [
    ("iters", 0, "iters"), ("iters", 2.5, "iters"), ("outlier_frac", 1.0, "outlier_frac"),
    ("outlier_frac", -0.1, "outlier_frac"), ("init", "awq", "init"), ("bits", 9, "bits"),
])
def test_option_errors(opt, value, match):
    with pytest.raises(RefqError, match=match) as e:
        quantize_weight(np.ones((2, 4), np.float32), np.eye(4), "quantease", **{opt: value})
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# real layers (SmolLM2 layer 0, H from 4 windows of 128 calibration tokens)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer0(smollm2_path):
    import os

    from conftest import REPO
    from llama_np import LINEAR_GROUPS, Tokenizer, load_model
    from refq.calibrate import calibration_windows, capture_hessians
    model, tok = load_model(smollm2_path), Tokenizer(smollm2_path)
    with open(os.path.join(REPO, "data", "calib.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read(30_000))
    windows = calibration_windows(ids, nsamples=4, seqlen=128, seed=0)
    hs = [model.embed(w) for w in windows]
    Hs = capture_hessians(model.layers[0], hs, np.arange(128), list(LINEAR_GROUPS))
    return model.layers[0], Hs


@pytest.mark.parametrize("name, kw", [
    ("self_attn.q_proj", dict(bits=3, group_size=128, iters=6)),
    ("self_attn.o_proj", dict(bits=2, group_size=64, init="rtn", iters=6)),
    ("self_attn.o_proj", dict(bits=3, outlier_frac=0.005, iters=4)),
])
def test_real_layer_monotone_and_beats_gptq(layer0, name, kw):
    from llama_np import LINEAR_GROUPS
    layer, Hs = layer0
    grp = next(g for g in LINEAR_GROUPS if name in g)
    W, H = layer.linears[name].weight, Hs[grp]
    qw = quantize_weight(W, H, "quantease", **kw)
    assert_monotone(qw.info["loss_trace"])
    if kw.get("init", "gptq") == "gptq":
        g = quantize_weight(W, H, "gptq", bits=kw["bits"], group_size=kw.get("group_size"),
                            act_order=True)
        assert qw.info["loss"] <= g.info["loss"]
