"""CLAQ (refq/methods/claq.py) and the "codebook" format (refq/formats/codebook.py)."""
import itertools
import json

import numpy as np
import pytest

import refq
from conftest import assert_one_line_error, real_weight
from refq.errors import RefqError
from refq.formats.codebook import CodebookWeight
from refq.methods.claq import allocate_bits, outlier_scores, reservation_counts


def best_partition_cost(x, k):
    """Brute force: min over all contiguous partitions of sorted x into <= k runs."""
    xs = np.sort(x)
    n = len(xs)
    best = np.inf
    for kk in range(1, min(k, n) + 1):
        for splits in itertools.combinations(range(1, n), kk - 1):
            b = (0,) + splits + (n,)
            best = min(best, sum(((xs[i:j] - xs[i:j].mean()) ** 2).sum() for i, j in zip(b[:-1], b[1:])))
    return best


# --------------------------------------------------------------------------- column codebooks
def test_identity_hessian_gives_optimal_kmeans_per_column():
    """With H = I there is no error feedback: each column's error must be the optimal
    k-means cost of that column (brute force), up to the fp16 rounding of the centroids."""
    rng = np.random.default_rng(0)
    W = rng.standard_t(3, size=(9, 6)).astype(np.float32)
    qw = refq.quantize_weight(W, np.eye(6), "claq", bits=2, act_order=False)
    E = (W.astype(np.float64) - qw.dequantize()) ** 2
    for j in range(6):
        opt = best_partition_cost(W[:, j].astype(np.float64), 4)
        assert opt <= E[:, j].sum() <= opt + 1e-5 * (1 + np.abs(W[:, j]).max() ** 2), j
    # every value decodes to the nearest fp16 centroid of its own column
    for b, cols in ((2, np.arange(6)),):
        cb = qw.codebooks[b].astype(np.float64)                  # (6, 4)
        for k, c in enumerate(cols):
            d = np.abs(W[:, c, None] - cb[k][None, :])
            np.testing.assert_allclose(np.abs(W[:, c] - qw.dequantize()[:, c]), d.min(1), rtol=1e-6)


def test_few_distinct_values_are_exact():
    """A column with <= 2^b distinct fp16 values (or all zero) is reproduced exactly."""
    W = np.array([[0, 1, 5, 0.5], [0, 1, -3, 0.5], [0, 2, 5, 0.25], [0, 2, 7, 0.5]], np.float32)
    qw = refq.quantize_weight(W, np.eye(4), "claq", bits=2)
    np.testing.assert_array_equal(qw.dequantize(), W)
    assert qw.info["loss"] == 0.0


# --------------------------------------------------------------------------- AP / OR rules
def test_outlier_score_by_hand():
    W = np.array([[100.0, 1, 1], [1, 1, -100], [1, 1, 1], [1, 1, 1]])
    # mean |W| = 210/12 = 17.5; t = 2 -> threshold 35: column 0 and 2 have one each
    np.testing.assert_array_equal(outlier_scores(W, 2.0), [1, 0, 1])
    np.testing.assert_array_equal(outlier_scores(W, 10.0), [0, 0, 0])


@pytest.mark.parametrize("bits", [2.0, 2.05, 2.1, 2.2, 2.5, 2.99, 3.0, 3.1, 3.5, 4.0])
def test_ap_hits_the_average(bits):
    rng = np.random.default_rng(1)
    n = 101
    scores = rng.integers(0, 7, size=n)
    cb = allocate_bits(scores, bits)
    assert abs(cb.mean() - bits) <= 1 / n + 1e-12
    lo = 2 if bits < 3 else 3
    assert set(np.unique(cb)) <= {lo, 4}
    # the 4-bit columns are the top-scoring ones (ties by index)
    order = np.lexsort((np.arange(n), -scores))
    n4 = int(np.sum(cb == 4))
    assert set(np.flatnonzero(cb == 4)) == set(order[:n4])


def test_reservation_counts_by_hand():
    scores = np.array([0, 9, 3, 9, 1, 0, 0, 0, 0, 0])
    # top 20% = columns 1 and 3 (ties by index): round(0.1 * 50) = 5 per tail; others round(0.02 * 50) = 1
    np.testing.assert_array_equal(reservation_counts(scores, 50, 0.1, 0.02, 0.2),
                                  [1, 5, 1, 5, 1, 1, 1, 1, 1, 1])


def test_outlier_reservation_keeps_both_tails_in_fp16():
    rng = np.random.default_rng(2)
    out, n = 200, 12
    W = rng.normal(size=(out, n)).astype(np.float32)
    W[rng.integers(0, out, 10), rng.integers(0, n, 10)] *= 30
    qw = refq.quantize_weight(W, np.eye(n), "claq", bits=2, outlier_reservation=True,
                              or_ratio_high=0.05, or_ratio_low=0.01, or_top_frac=0.25,
                              outlier_threshold=3.0)
    Wh = qw.dequantize()
    counts = reservation_counts(outlier_scores(W.astype(np.float64), 3.0), out, 0.05, 0.01, 0.25)
    for j in range(n):
        o = np.argsort(W[:, j], kind="stable")
        kept = np.concatenate([o[:counts[j]], o[out - counts[j]:]])
        np.testing.assert_allclose(Wh[kept, j], W[kept, j], rtol=2 ** -10)    # fp16 precision
    assert set(np.unique(counts)) == {2, 10}
    assert qw.outliers.nnz <= 2 * counts.sum()
    # reservation must lower the loss a lot on a matrix with large outliers
    plain = refq.quantize_weight(W, np.eye(n), "claq", bits=2)
    assert qw.info["loss"] < 0.5 * plain.info["loss"]


# --------------------------------------------------------------------------- bits, format
def test_bits_per_weight_by_hand():
    rng = np.random.default_rng(3)
    out, n = 10, 7
    W = rng.normal(size=(out, n)).astype(np.float32)
    W[0, 0] = 40.0
    cbits = [2, 4, 3, 2, 4, 2, 8]
    qw = refq.quantize_weight(W, np.eye(n), "claq", column_bits=cbits, outlier_reservation=True,
                              or_ratio_high=0.1, or_ratio_low=0.0, or_top_frac=1 / 7)
    nnz = qw.outliers.nnz
    assert nnz == 2                                   # column 0 (top score): 1 per tail
    codes = (ceil8(3 * 2) + ceil8(1 * 3) + ceil8(2 * 4) + ceil8(1 * 8)) * out   # bytes per width
    books = (3 * 4 + 1 * 8 + 2 * 16 + 1 * 256) * 2
    column_bits = n
    outliers = (out + 1) * 4 + nnz * 2 + nnz * 2
    total = codes + books + column_bits + outliers
    assert qw.bits_per_weight == pytest.approx(8 * total / (out * n))
    assert sum(qw.bits_breakdown.values()) == pytest.approx(qw.bits_per_weight)
    assert qw.bits_breakdown["codebooks"] == pytest.approx(8 * books / (out * n))


def ceil8(nbits):
    return (nbits + 7) // 8


def test_round_trip_through_tensors():
    rng = np.random.default_rng(4)
    W = rng.normal(size=(33, 20)).astype(np.float32)
    X = rng.normal(size=(300, 20))
    qw = refq.quantize_weight(W, X.T @ X / 300, "claq", bits=2.5, outlier_reservation=True)
    back = refq.load_quantized(qw.tensors(), json.loads(json.dumps(qw.meta())))
    np.testing.assert_array_equal(back.dequantize(), qw.dequantize())
    assert back.bits_per_weight == qw.bits_per_weight
    bad = dict(qw.tensors())
    bad["codebook_4"] = bad["codebook_4"][:, :8]
    with pytest.raises(RefqError, match="codebook_4"):
        CodebookWeight.from_tensors(bad, qw.meta())


def test_deterministic_and_order_independent_of_threads():
    rng = np.random.default_rng(5)
    W = rng.normal(size=(64, 48)).astype(np.float32)
    X = rng.normal(size=(500, 48))
    H = X.T @ X / 500
    a = refq.quantize_weight(W, H, "claq", bits=2.2, outlier_reservation=True)
    b = refq.quantize_weight(W, H, "claq", bits=2.2, outlier_reservation=True)
    for k, t in a.tensors().items():
        np.testing.assert_array_equal(t, b.tensors()[k])


def test_error_feedback_beats_independent_columns():
    """On a correlated H, the GPTQ feedback must lower the loss compared with quantizing
    every column alone (H = I solution scored on the real H)."""
    rng = np.random.default_rng(6)
    n = 32
    X = rng.normal(size=(600, n)) @ rng.normal(size=(n, n))
    H = X.T @ X / 600
    W = rng.normal(size=(40, n)).astype(np.float32)
    fb = refq.quantize_weight(W, H, "claq", bits=2)
    alone = refq.quantize_weight(W, np.eye(n), "claq", bits=2, act_order=False)
    assert fb.info["loss"] < 0.7 * refq.layer_loss(W, alone.dequantize(), H)


# --------------------------------------------------------------------------- real layers
@pytest.mark.parametrize("layer, name", [(0, "mlp.up_proj"), (10, "self_attn.q_proj"),
                                         (10, "mlp.down_proj")])
def test_claq_beats_gptq_on_real_layers(real_layers, layer, name):
    """Measured (act_order both, 8x128 tokens): CLAQ/GPTQ loss 0.2-0.6 at 2 and 3 bits on
    these layers.  Per-column codebooks lose on layer 0's q_proj (ratio ~1.3 without
    act_order) whose rows have very different scales: that one is not asserted."""
    W, H = real_weight(real_layers, layer, name)
    for bits in (2, 3):
        c = refq.quantize_weight(W, H, "claq", bits=bits, ap=False)
        g = refq.quantize_weight(W, H, "gptq", bits=bits, act_order=True)
        assert c.info["loss"] <= g.info["loss"], (bits, c.info["loss"], g.info["loss"])
    ap = refq.quantize_weight(W, H, "claq", bits=2.5)
    assert ap.info["loss"] < refq.quantize_weight(W, H, "claq", bits=2).info["loss"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("opts, match", [
    (dict(bits=4.5), "2..4"),
    (dict(bits=1.5), "2..8"),
    (dict(bits=2.5, ap=False), "adaptive precision"),
    (dict(or_ratio_high=0.5), "or_ratio_high"),
    (dict(or_ratio_low=-0.1), "or_ratio_low"),
    (dict(outlier_threshold=0), "outlier_threshold"),
    (dict(or_fit="middle"), "or_fit"),
    (dict(column_bits=[2, 9, 2]), "column_bits"),
    (dict(group_size=8), "unknown option 'group_size'"),
])
def test_bad_options(opts, match):
    with pytest.raises(RefqError, match=match):
        refq.quantize_weight(np.ones((4, 3), np.float32), np.eye(3), "claq", **opts)


def test_bad_column_bits_length_and_nan():
    with pytest.raises(RefqError, match="column_bits has 2 entries"):
        refq.quantize_weight(np.ones((4, 3), np.float32), np.eye(3), "claq", column_bits=[2, 2])
    W = np.ones((4, 3), np.float32)
    W[1, 1] = np.nan
    with pytest.raises(RefqError, match="NaN"):
        refq.quantize_weight(W, np.eye(3), "claq")


def test_zero_columns_are_fine():
    W = np.zeros((8, 4), np.float32)
    W[:, 1] = np.arange(8)
    qw = refq.quantize_weight(W, np.eye(4), "claq", bits=3, outlier_reservation=True)
    np.testing.assert_array_equal(qw.dequantize(), W)


@pytest.mark.parametrize("argv, names", [
    (["--bits", "4.5"], ["--method claq", "bits 4.5"]),
    (["--or-ratio-low", "0.7"], ["--or-ratio-low", "[0, 0.5)"]),
    (["--bits", "2.5", "--no-ap"], ["--method claq", "adaptive precision"]),
    (["--or-fit", "x"], ["--or-fit", "after"]),
])
def test_cli_bad_options_one_line(tiny_ckpt, tmp_path, capsys, argv, names):
    from refq.cli import main
    folder, _ = tiny_ckpt(layers=1, hidden=32, ff=40)
    rc = main(["quantize", "--model", folder, "--method", "claq", "--out", str(tmp_path / "o")] + argv)
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.out, cap.err, *names)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_quantize_eval_info(tiny_ckpt, tmp_path, capsys):
    from refq.cli import main
    folder, _ = tiny_ckpt(layers=2, hidden=32, ff=40)
    out = str(tmp_path / "packed")
    rc = main(["quantize", "--model", folder, "--method", "claq", "--bits", "2.5",
               "--outlier-reservation", "--nsamples", "4", "--seqlen", "16", "--out", out, "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(cap.out)
    assert res["options"]["bits"] == 2.5 and res["options"]["outlier_reservation"] is True
    assert all(r["bits_per_weight"] > 2.5 for r in res["layers"])        # codebooks cost extra
    rc = main(["info", out, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["method"] == "claq"
    assert info["bits_per_weight"] == pytest.approx(res["bits_per_weight"])
    from refq.checkpoint import load_packed
    _, _, qc, qws = load_packed(out)
    assert {q.FORMAT for q in qws.values()} == {"codebook"}
    assert all(abs(q.info["mean_column_bits"] - 2.5) <= 1 / q.shape[1] for q in qws.values())


def test_round_fp16_equals_numpy_half():
    from refq.methods.claq import round_fp16
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.normal(size=2000) * 10.0 ** rng.integers(-9, 4, size=2000),
                        np.float16(rng.normal(size=200)).astype(np.float64) * (1 + 2.0 ** -11),  # ties
                        [0.0, -0.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 65504.0, 2.0 ** -14]])
    got = np.array([round_fp16(v) for v in x])
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float64))
