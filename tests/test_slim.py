"""SLiM: SLiM-Quant, low-rank adapters and the one-shot pipeline.

Independent truths used here:
- SLiM-Quant's α: a dense scan of every candidate α (every histogram bin
  centre), with the error written differently from refq's (one clipped
  rounding Δ·min(round(v/Δ), m) for every value instead of refq's two
  branches); the coarse-then-fine search must land on its argmin.
- Adapters: at full rank L R = E (to float64 round-off, and the stored fp16
  weight to fp16 round-off); with a diagonal H the weighted error left after
  rank r is Σ_{k>r} s_k² of the SVD of E·diag(x̄) (Eckart–Young), computed here
  from singular values alone; the loss never rises with the rank.
- bits_per_weight counted by hand from the layout in FORMAT.md.
"""
import numpy as np
import pytest

from conftest import assert_one_line_error
from refq.api import layer_loss, load_quantized, quantize_weight
from refq.errors import RefqError
from refq.methods.slim import low_rank_adapters, slim_quant_alpha


def problem(out, n, seed, tokens=400, diagonal=False):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)).astype(np.float32)
    scales = rng.uniform(0.2, 3.0, size=n)
    if diagonal:
        return W, np.diag(scales ** 2)
    mix = rng.standard_normal((n, n)) * 0.5 + np.eye(n)
    X = rng.standard_normal((tokens, n)) @ mix * scales
    return W, X.T @ X / tokens


def assert_24(keep):
    out, n = keep.shape
    assert np.all(keep.reshape(out, n // 4, 4).sum(axis=2) == 2)


# --------------------------------------------------------------------------- SLiM-Quant
def dense_scan(W, bits):
    """Objective at every candidate α (bin centres of the |W| histogram) -> (centres, J)."""
    a = np.abs(np.asarray(W, np.float64)).ravel()
    nb = max(512, min(a.size // 1000, 20000))
    counts, edges = np.histogram(a, bins=nb, range=(0, a.max()))
    v = (edges[:-1] + edges[1:]) / 2
    m = 2 ** (bits - 1) - 1
    J = np.empty(nb)
    for k, alpha in enumerate(v):
        step = alpha / m
        Q = step * np.minimum(np.round(v / step), m)       # round, then clip at α
        J[k] = np.sum(counts * (v - Q) ** 2) / a.size
    return v, J


@pytest.mark.parametrize("dist", ["normal", "laplace", "student3", "uniform"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_slim_quant_alpha_is_argmin_of_dense_scan(dist, bits):
    rng = np.random.default_rng(bits)
    W = {"normal": lambda: rng.standard_normal((300, 700)),
         "laplace": lambda: rng.laplace(size=(300, 700)),
         "student3": lambda: rng.standard_t(3, size=(300, 700)),
         "uniform": lambda: rng.uniform(-1, 1, size=(300, 700))}[dist]()
    alpha, J_alpha = slim_quant_alpha(W, bits)
    v, J = dense_scan(W, bits)
    assert J_alpha == pytest.approx(J.min(), rel=1e-9)
    assert alpha == pytest.approx(v[np.argmin(J)], rel=1e-12)
    if dist != "uniform":
        assert alpha < np.abs(W).max()                      # heavy tails: it clips


def test_act_weighted_alpha_is_argmin_of_weighted_scan():
    rng = np.random.default_rng(11)
    W = rng.laplace(size=(200, 600))
    h = rng.uniform(0.01, 5.0, 600) ** 2                    # H_jj
    H = np.diag(h)
    q = quantize_weight(W.astype(np.float32), H, "slim-quant", act_weighted=True)
    a = np.abs(W.astype(np.float32).astype(np.float64))
    wts = np.broadcast_to(h, a.shape).ravel()
    counts, edges = np.histogram(a.ravel(), bins=512, range=(0, a.max()), weights=wts)
    v = (edges[:-1] + edges[1:]) / 2
    J = [np.sum(counts * (v - (al / 7) * np.minimum(np.round(v / (al / 7)), 7)) ** 2) for al in v]
    assert q.info["alpha"] == pytest.approx(v[np.argmin(J)], rel=1e-12)
    with pytest.raises(RefqError, match="act_weighted needs the Hessian"):
        quantize_weight(W.astype(np.float32), None, "slim-quant", act_weighted=True)


def test_slim_quant_codes_and_error():
    rng = np.random.default_rng(1)
    W = rng.standard_t(4, size=(64, 256)).astype(np.float32)
    q = quantize_weight(W, None, "slim-quant", bits=4)
    alpha = q.info["alpha"]
    scale = float(np.float16(alpha / 7))
    # q = clamp(round(W * 7 / α), -8, 7) with the fp16 scale
    expect = scale * np.clip(np.round(W.astype(np.float64) / scale), -8, 7)
    np.testing.assert_allclose(q.dequantize(), expect, rtol=1e-6, atol=1e-7)
    assert q.pattern == "dense" and q.grid == "tensor"
    # clipping pays: lower weight MSE than absmax (α = max|W|) on heavy tails
    s_abs = np.abs(W).max() / 7
    absmax = s_abs * np.clip(np.round(W / s_abs), -8, 7)
    assert np.mean((q.dequantize() - W) ** 2) < 0.7 * np.mean((absmax - W) ** 2)
    # one fp16 scale for the whole tensor
    assert q.bits_per_weight == pytest.approx((64 * 128 * 8 + 16) / (64 * 256))


# --------------------------------------------------------------------------- adapters
def test_adapters_full_rank_reproduce_error():
    rng = np.random.default_rng(2)
    E = rng.standard_normal((20, 12))
    xbar = rng.uniform(0.1, 4, 12)
    L, R = low_rank_adapters(E, xbar, 12)
    assert L.shape == (20, 12) and R.shape == (12, 12)
    np.testing.assert_allclose(L @ R, E, rtol=0, atol=1e-12)


def test_slim_full_rank_reproduces_w():
    W, H = problem(16, 32, seed=3)
    q = quantize_weight(W, H, "slim", rank=16, refit=False)
    assert_24(q.keep())
    W_c, (L, R) = q.base(), q.adapters()
    assert L.shape == (16, 16) and R.shape == (16, 32)
    # only the fp16 rounding of L and R is left
    np.testing.assert_allclose(q.dequantize(), W, rtol=0, atol=2e-3)
    lost = layer_loss(W, W_c, H)
    assert layer_loss(W, q.dequantize(), H) < 1e-5 * lost


def test_weighted_residual_is_eckart_young_with_diagonal_h():
    W, H = problem(24, 40, seed=4, diagonal=True)
    q0 = quantize_weight(W, H, "slim", rank_ratio=0.0)
    E = W - q0.base().astype(np.float64)
    xbar = np.sqrt(np.diag(H))
    s = np.linalg.svd(E * xbar, compute_uv=False)
    for r in (1, 5, 13, 24):
        L, R = low_rank_adapters(E, xbar, r)
        assert layer_loss(E, L @ R, H) == pytest.approx(np.sum(s[r:] ** 2), rel=1e-9, abs=1e-9)
        # plain SVD of E (no activation scaling) is never better in this loss
        U, S, Vt = np.linalg.svd(E, full_matrices=False)
        plain = (U[:, :r] * S[:r]) @ Vt[:r]
        assert layer_loss(E, L @ R, H) <= layer_loss(E, plain, H) * (1 + 1e-12) + 1e-20


def test_loss_falls_monotonically_with_rank():
    W, H = problem(32, 48, seed=5)
    E = W - quantize_weight(W, H, "slim", rank_ratio=0.0).base().astype(np.float64)
    xbar = np.sqrt(np.diag(H))
    losses = [layer_loss(E, low_rank_adapters(E, xbar, r)[0] @ low_rank_adapters(E, xbar, r)[1], H)
              if r else layer_loss(E, np.zeros_like(E), H) for r in range(33)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 1e-20 * losses[0] + 1e-20
    # stored (fp16 adapters), through the method, at a few ranks
    stored = [layer_loss(W, quantize_weight(W, H, "slim", rank=r, refit=False).dequantize(), H)
              for r in (0, 2, 6, 12, 24, 32)]
    assert all(b < a for a, b in zip(stored, stored[1:])), stored
    # refit (default) is never worse than without
    for r in (2, 12):
        a = quantize_weight(W, H, "slim", rank=r)
        b = quantize_weight(W, H, "slim", rank=r, refit=False)
        assert a.info["loss"] <= b.info["loss"]


def test_quantized_adapters():
    W, H = problem(16, 40, seed=6)
    q = quantize_weight(W, H, "slim", rank=6, adapter_bits=4, adapter_group_size=16)
    L, R = q.adapters()
    # symmetric 4-bit grid per group: at most 16 distinct values in each group
    for A, g in ((L, 16), (R, 16)):
        for c0 in range(0, A.shape[1], g):
            for row in A[:, c0:c0 + g]:
                assert len(np.unique(row)) <= 16
    f = quantize_weight(W, H, "slim", rank=6)
    assert q.info["loss"] < layer_loss(W, quantize_weight(W, H, "slim", rank_ratio=0).dequantize(), H)
    assert q.bits_per_weight < f.bits_per_weight


# --------------------------------------------------------------------------- format
def test_bits_per_weight_hand_count():
    W, H = problem(16, 32, seed=7)
    q = quantize_weight(W, H, "slim", rank=3)
    # base: 16 kept per row at 4 bits (8 bytes) + positions 16 x 2 bits (4 bytes); one fp16 scale;
    # adapters fp16: L 16 x 3, R 3 x 32
    bits = 16 * (8 + 4) * 8 + 16 + (16 * 3 + 3 * 32) * 16
    assert q.bits_per_weight == pytest.approx(bits / 512)
    assert q.bits_breakdown["adapters"] == pytest.approx((16 * 3 + 3 * 32) * 16 / 512)
    q = quantize_weight(W, H, "slim", rank=3, adapter_bits=4, adapter_group_size=8)
    # L: 16 rows x ceil(3*4/8)=2 bytes + 16 x 1 fp16 scales; R: 3 rows x 16 bytes + 3 x 4 scales
    adapters = 16 * 2 * 8 + 16 * 16 + 3 * 16 * 8 + 3 * 4 * 16
    assert q.bits_per_weight == pytest.approx((16 * (8 + 4) * 8 + 16 + adapters) / 512)
    q = quantize_weight(W, H, "slim", rank=3, bits=16)      # fp16 kept values, no scale
    assert q.bits_per_weight == pytest.approx((16 * (32 + 4) * 8 + (16 * 3 + 3 * 32) * 16) / 512)


@pytest.mark.parametrize("kw", [dict(), dict(pruner="sparsegpt"), dict(pruner="magnitude"),
                                dict(adapter_bits=4, adapter_group_size=8),
                                dict(sparsity=0.5, pruner="sparsegpt", bits=3)])
def test_round_trip_and_matmul(kw):
    W, H = problem(12, 24, seed=8)
    q = quantize_weight(W, H, "slim", rank=4, **kw)
    r = load_quantized({k: v.copy() for k, v in q.tensors().items()}, q.meta())
    np.testing.assert_array_equal(r.dequantize(), q.dequantize())
    x = np.random.default_rng(1).standard_normal((5, 24)).astype(np.float32)
    L, R = r.adapters()
    expect = x @ r.base().T + (x @ R.T) @ L.T          # y = x W_cᵀ + (x Rᵀ) Lᵀ
    np.testing.assert_allclose(r.matmul(x), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.matmul(x), x @ q.dequantize().T, rtol=1e-4, atol=1e-4)
    if kw.get("sparsity", "2:4") == "2:4":
        assert_24(r.keep())


def test_deterministic():
    W, H = problem(12, 32, seed=9)
    a = quantize_weight(W, H, "slim", rank=5, pruner="sparsegpt", adapter_bits=4)
    b = quantize_weight(W, H, "slim", rank=5, pruner="sparsegpt", adapter_bits=4)
    for k in a.tensors():
        np.testing.assert_array_equal(a.tensors()[k], b.tensors()[k])


# --------------------------------------------------------------------------- bad input
def test_bad_input_one_line_errors():
    W, H = problem(6, 12, seed=10)
    with pytest.raises(RefqError, match=r"^l1: option rank 7 exceeds min\(out, in\) = 6"):
        quantize_weight(W, H, "slim", rank=7, name="l1")
    W10, H10 = problem(6, 10, seed=10)
    with pytest.raises(RefqError, match="2:4 sparsity needs in_features divisible by 4"):
        quantize_weight(W10, H10, "slim")
    with pytest.raises(RefqError, match="option sparsity must be '2:4'"):
        quantize_weight(W, H, "slim", sparsity="8:16")
    with pytest.raises(RefqError, match="option pruner"):
        quantize_weight(W, H, "slim", pruner="obc")
    with pytest.raises(RefqError, match="option adapter_bits"):
        quantize_weight(W, H, "slim", adapter_bits=9)
    with pytest.raises(RefqError, match="option rank_ratio"):
        quantize_weight(W, H, "slim", rank_ratio=1.5)
    with pytest.raises(RefqError, match="unknown option 'sparsity'"):
        quantize_weight(W, H, "slim-quant", sparsity="2:4")
    for e in (RefqError("x"),):
        assert "\n" not in str(e)


def test_cli_rank_too_large_is_one_line(tiny_ckpt, tmp_path, capsys):
    from refq.cli import main
    folder, _ = tiny_ckpt(layers=1, hidden=32, ff=40)
    calib = tmp_path / "calib.txt"
    from conftest import tiny_text
    calib.write_text(tiny_text(list(np.arange(2, 64)) * 4))
    capsys.readouterr()
    rc = main(["quantize", "--model", folder, "--method", "slim", "--rank", "33",
               "--calib", str(calib), "--nsamples", "2", "--seqlen", "16",
               "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    # the shapes are known only once calibration runs: the error follows the progress bar
    assert "refq quantize: error:" in err, err
    # (the CLI's progress bar is redrawn around it on stderr: look at the error's own line)
    line = err[err.index("refq quantize: error:"):].splitlines()[0]
    assert_one_line_error(rc, out, line, "rank 33", "min(out, in)")


# --------------------------------------------------------------------------- real layer
def test_real_layer_slim(smollm2_path):
    """SmolLM2 layer 0 o_proj with an H from 8 x 128 tokens: each SLiM stage helps."""
    import os

    from conftest import REPO
    from llama_np import Tokenizer, load_model
    from refq.calibrate import calibration_windows, capture_hessians
    model, tok = load_model(smollm2_path), Tokenizer(smollm2_path)
    with open(os.path.join(REPO, "data", "calib.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read(60_000))
    hs = [model.embed(w) for w in calibration_windows(ids, nsamples=8, seqlen=128, seed=0)]
    g = ("self_attn.o_proj",)
    H = capture_hessians(model.layers[0], hs, np.arange(128), [g])[g]
    W = model.layers[0].linears["self_attn.o_proj"].dequantize()
    v, J = dense_scan(W, 4)
    assert slim_quant_alpha(W, 4)[1] == pytest.approx(J.min(), rel=1e-9)
    loss = {}
    for key, kw in {"24q": dict(rank_ratio=0), "r.05": dict(rank_ratio=0.05),
                    "r.1": dict(), "r.2": dict(rank_ratio=0.2),
                    "r.1 a4": dict(adapter_bits=4)}.items():
        q = quantize_weight(W, H, "slim", **kw)
        assert_24(q.keep())
        loss[key] = q.info["loss"]
    print({k: round(v, 5) for k, v in loss.items()})
    assert loss["r.2"] < loss["r.1"] < loss["r.05"] < loss["24q"]
    # measured: 2.996 (rank 0), 0.0232 (0.05), 0.0177 (0.1), 0.0112 (0.2), 0.0460 (0.1, 4-bit adapters)
    assert loss["r.1"] <= loss["r.1 a4"] < 0.1 * loss["24q"]
