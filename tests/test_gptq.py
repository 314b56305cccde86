"""GPTQ against an independent textbook transcription (OBS updates on the full
inverse Hessian, one column at a time, no blocking, no Cholesky, no numba),
against RTN when H = identity, and its damping / dead-channel handling."""

import warnings

import numpy as np
import pytest

from refq.api import layer_loss, quantize_weight
from refq.errors import RefqError
from refq.methods.gptq import DampingWarning


# ---------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------
def ref_grid(x, bits, sym, mse):
    """Min-max grid per row of x (rows, m) as GPTQ quant.py, float16 scales."""
    maxq = 2 ** bits - 1
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = np.where(xmin < 0, -xmax, 0.0)
    zero_range = (xmin == 0) & (xmax == 0)
    xmin = np.where(zero_range, -1.0, xmin)
    xmax = np.where(zero_range, 1.0, xmax)

    def grid(lo, hi):
        s = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
        z = np.full_like(s, 2 ** (bits - 1)) if sym else np.clip(np.round(-lo / s), 0, maxq)
        return s, z

    s, z = grid(xmin, xmax)
    if mse:
        best = np.full(len(s), np.inf)
        for i in range(80):
            s1, z1 = grid((1 - i / 100) * xmin, (1 - i / 100) * xmax)
            e = np.sum(np.abs(s1[:, None] * (quant(x, s1, z1, maxq) - z1[:, None]) - x) ** 2.4, 1)
            s, z, best = np.where(e < best, s1, s), np.where(e < best, z1, z), np.minimum(e, best)
    return s, z


def quant(x, s, z, maxq):
    return np.clip(np.round(x / s[:, None]) + z[:, None], 0, maxq)


def ref_gptq(W, H, bits=4, group_size=None, sym=False, mse=False, act_order=False,
             static_groups=False, percdamp=0.01):
    """-> codes (out, in) in ORIGINAL column order, W_hat (out, in) float64."""
    W = W.astype(np.float64).copy()
    H = H.copy()
    out, n = W.shape
    maxq = 2 ** bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = group_size or n
    grids = {}
    if static_groups:
        for k in range(0, n, g):
            grids[k // g] = ref_grid(W[:, k:k + g], bits, sym, mse)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    Hinv = np.linalg.inv(H + percdamp * np.mean(np.diag(H)) * np.eye(n))
    codes = np.zeros((out, n), dtype=np.int64)
    What = np.zeros((out, n))
    for t, j in enumerate(order):
        if static_groups:
            s, z = grids[j // g]
        elif t % g == 0:
            s, z = ref_grid(W[:, order[t:t + g]], bits, sym, mse)   # fit on updated W
        c = quant(W[:, [j]], s, z, maxq)[:, 0]
        codes[:, j] = c
        What[:, j] = s * (c - z)
        err = (W[:, j] - What[:, j]) / Hinv[j, j]                    # OBS (paper eq. 2)
        rest = order[t + 1:]
        W[:, rest] -= np.outer(err, Hinv[j, rest])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]  # remove j (eq. 3)
    return codes, What


def original_codes(qw):
    c = qw.codes().astype(np.int64)
    if qw.perm is None:
        return c
    full = np.empty_like(c)
    full[:, qw.perm.astype(np.int64)] = c
    return full


def correlated_problem(out, n, seed, tokens=400):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)).astype(np.float32)
    mix = rng.standard_normal((n, n)) * 0.6 + np.eye(n)
    X = rng.standard_normal((tokens, n)) @ mix * rng.uniform(0.2, 3.0, size=n)
    return W, X.T @ X / tokens


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(), dict(sym=True), dict(bits=3, group_size=8), dict(bits=2, group_size=7, sym=True),
    dict(act_order=True), dict(act_order=True, group_size=8), dict(mse=True, group_size=8),
])
def test_identity_hessian_equals_rtn(kw):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 40)).astype(np.float32)
    H = np.eye(40)
    g = quantize_weight(W, H, "gptq", **kw)
    r = quantize_weight(W, None, "rtn", **{k: v for k, v in kw.items() if k != "act_order"})
    np.testing.assert_array_equal(original_codes(g), r.codes())
    np.testing.assert_array_equal(g.dequantize(), r.dequantize())


@pytest.mark.parametrize("kw", [dict(act_order=True), dict(act_order=True, group_size=8, static_groups=True)])
def test_diagonal_hessian_act_order_equals_rtn(kw):
    # no off-diagonal terms: nothing to compensate, grids independent of order
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 20)).astype(np.float32)
    H = np.diag(rng.uniform(0.1, 5, 20))
    g = quantize_weight(W, H, "gptq", **kw)
    r = quantize_weight(W, None, "rtn", group_size=kw.get("group_size"))
    assert g.perm is None
    np.testing.assert_array_equal(g.codes(), r.codes())


CASES = [
    ((8, 32), dict()),
    ((8, 32), dict(bits=3, sym=True)),
    ((8, 32), dict(group_size=8, blocksize=5)),
    ((8, 32), dict(act_order=True, blocksize=6)),
    ((8, 32), dict(act_order=True, group_size=8, blocksize=12)),
    ((8, 32), dict(act_order=True, group_size=8, static_groups=True, blocksize=5)),
    ((5, 20), dict(group_size=8)),
    ((5, 20), dict(bits=2, group_size=8, act_order=True, blocksize=3)),
    ((5, 20), dict(bits=3, group_size=8, act_order=True, static_groups=True)),
    ((5, 20), dict(group_size=8, static_groups=True, sym=True, blocksize=7)),
    ((6, 24), dict(group_size=5, mse=True, act_order=True, blocksize=4)),
    ((6, 24), dict(percdamp=0.1, bits=8, blocksize=1)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_textbook_reference(case):
    shape, kw = CASES[case]
    W, H = correlated_problem(*shape, seed=100 + case)
    qw = quantize_weight(W, H, "gptq", **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "blocksize"}
    codes, What = ref_gptq(W, H, **ref_kw)
    np.testing.assert_array_equal(original_codes(qw), codes)
    np.testing.assert_allclose(qw.dequantize(), What, rtol=1e-6, atol=1e-7)
    assert qw.info["loss"] == pytest.approx(layer_loss(W, What, H), rel=1e-6)
    # perm is stored only when groups follow the processing order
    expect_perm = kw.get("act_order", False) and kw.get("group_size") and not kw.get("static_groups")
    assert (qw.perm is not None) == bool(expect_perm)


@pytest.mark.parametrize("kw", [dict(), dict(group_size=16), dict(group_size=16, act_order=True),
                                dict(bits=3, sym=True, act_order=True)])
def test_gptq_beats_rtn_on_correlated_hessian(kw):
    W, H = correlated_problem(32, 64, seed=5, tokens=1000)
    g = quantize_weight(W, H, "gptq", **kw)
    r = quantize_weight(W, H, "rtn", **{k: v for k, v in kw.items() if k != "act_order"})
    lg, lr = layer_loss(W, g.dequantize(), H), layer_loss(W, r.dequantize(), H)
    assert lg == pytest.approx(g.info["loss"], rel=1e-9)
    assert lg < 0.8 * lr


def test_blocksize_does_not_change_result():
    W, H = correlated_problem(7, 45, seed=7)
    ref = quantize_weight(W, H, "gptq", group_size=10, act_order=True, blocksize=128)
    for bs in (1, 4, 13, 45):
        qw = quantize_weight(W, H, "gptq", group_size=10, act_order=True, blocksize=bs)
        np.testing.assert_array_equal(qw.codes(), ref.codes())
        np.testing.assert_array_equal(qw.perm, ref.perm)


def test_dead_channels():
    W, H = correlated_problem(6, 16, seed=9)
    for j in (3, 11):
        H[j, :] = 0
        H[:, j] = 0
    qw = quantize_weight(W, H, "gptq", group_size=8, act_order=True)
    assert qw.info["dead_inputs"] == 2
    deq = qw.dequantize()
    np.testing.assert_array_equal(deq[:, [3, 11]], 0)
    codes, What = ref_gptq(W, H, group_size=8, act_order=True)
    np.testing.assert_array_equal(original_codes(qw), codes)
    # the loss ignores dead inputs: equal to the loss on live columns only
    live = np.setdiff1d(np.arange(16), [3, 11])
    assert qw.info["loss"] == pytest.approx(
        layer_loss(W[:, live], deq[:, live], H[np.ix_(live, live)]), rel=1e-9)


def test_cholesky_failure_retries_with_more_damping():
    rng = np.random.default_rng(11)
    n = 12
    Qm, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.ones(n)
    lam[0] = -0.5          # not PD; mean diag = (n - 1.5)/n, so percdamp 1 is needed
    H = (Qm * lam) @ Qm.T
    W = rng.standard_normal((4, n)).astype(np.float32)
    with pytest.warns(DampingWarning, match=r"layers\.0\.mlp\.up_proj.*percdamp=1\b"):
        qw = quantize_weight(W, H, "gptq", name="layers.0.mlp.up_proj")
    assert qw.info["percdamp_used"] == pytest.approx(1.0)
    assert qw.info["damping_retries"] == 2
    codes, _ = ref_gptq(W, H, percdamp=1.0)
    np.testing.assert_array_equal(qw.codes(), codes)


def test_hopeless_hessian_raises():
    H = -np.eye(6)
    H[0, 0] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RefqError, match="lin"):
            quantize_weight(np.ones((2, 6), np.float32), H, "gptq", name="lin")


def test_deterministic():
    W, H = correlated_problem(9, 30, seed=13)
    a = quantize_weight(W, H, "gptq", group_size=8, act_order=True)
    b = quantize_weight(W, H, "gptq", group_size=8, act_order=True)
    for k in a.tensors():
        np.testing.assert_array_equal(a.tensors()[k], b.tensors()[k])


def test_gptq_errors():
    W = np.ones((2, 4), np.float32)
    with pytest.raises(RefqError, match="needs the Hessian"):
        quantize_weight(W, None, "gptq")
    with pytest.raises(RefqError, match="static_groups"):
        quantize_weight(W, np.eye(4), "gptq", static_groups=True)
    with pytest.raises(RefqError, match="H must have shape"):
        quantize_weight(W, np.eye(5), "gptq")


def test_act_order_ties_are_stable():
    n = 16
    H = 2 * np.eye(n) + 0.05 * (np.ones((n, n)) - np.eye(n))   # all diag entries tie
    H[5, 5] = H[9, 9] = 3.0
    W = np.random.default_rng(17).standard_normal((3, n)).astype(np.float32)
    qw = quantize_weight(W, H, "gptq", act_order=True, group_size=4)
    assert qw.perm.tolist() == [5, 9] + [j for j in range(n) if j not in (5, 9)]


def test_identity_hessian_half_ties_round_to_even():
    # exact .5 ties (0.5/1, -1.5, 2.5) must round half-to-even in the numba kernel too
    # row 0: scale 1, zero 1: 0.5 -> 0 ; row 1: scale 2, zero 1: 1/2 -> 0, 3/2 -> 2
    W = np.array([[-1.0, 0.5, 2.0, 0.25], [-2.0, 1.0, 4.0, 3.0]], np.float32)
    g = quantize_weight(W, np.eye(4), "gptq", bits=2)
    np.testing.assert_array_equal(g.codes(), [[0, 1, 3, 1], [0, 1, 3, 3]])
