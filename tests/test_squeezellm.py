"""SqueezeLLM (refq/methods/squeezellm.py, refq/formats/row_lut.py): per-row
weighted k-means against brute force over contiguous partitions, equal weights
= unweighted k-means, dense-and-sparse outliers by hand, bits by hand."""

import itertools
import math

import numpy as np
import pytest

from refq.api import layer_loss, load_quantized, quantize_weight
from refq.errors import RefqError
from refq.methods.kmeans1d import kmeans1d


def brute_force_kmeans(x, w, k):
    """Optimal weighted 1-D k-means by trying every split of the sorted values
    into k contiguous non-empty runs -> ascending centroids (k,)."""
    o = np.argsort(x, kind="stable")
    x, w = x[o], w[o]
    best, best_c = np.inf, None
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        bounds = (0,) + cuts + (len(x),)
        cost, cents = 0.0, []
        for a, b in zip(bounds, bounds[1:]):
            c = np.sum(w[a:b] * x[a:b]) / np.sum(w[a:b])
            cost += np.sum(w[a:b] * (x[a:b] - c) ** 2)
            cents.append(c)
        if cost < best - 1e-15:
            best, best_c = cost, np.array(cents)
    return best_c


def lut_of(c):
    return np.sort(np.asarray(c).astype(np.float16)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_rows_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((3, 9)).astype(np.float32)
    d = rng.uniform(0.1, 5.0, 9)                                 # diag(H): the column weights
    H = np.diag(d)
    q = quantize_weight(W, H, "squeezellm", bits=2)
    for r in range(3):
        np.testing.assert_array_equal(q.lut[r].astype(np.float32),
                                      lut_of(brute_force_kmeans(W[r].astype(np.float64), d, 4)))
    # codes: the nearest table entry
    lut = q.lut.astype(np.float64)
    dist = np.abs(W[:, :, None] - lut[:, None, :])
    np.testing.assert_array_equal(np.take_along_axis(dist, q.codes()[:, :, None].astype(np.int64), 2)[..., 0],
                                  dist.min(2))


def test_weights_matter():
    # a row whose unweighted and weighted optima differ
    W = np.array([[0.0, 0.13, 0.2, 1.0, 1.1, 2.0, 2.1, 5.0]], np.float32)
    d = np.array([1, 1, 1, 1, 1, 1, 1, 1e-4])
    a = quantize_weight(W, np.diag(d), "squeezellm", bits=2)
    b = quantize_weight(W, np.eye(8), "squeezellm", bits=2)
    np.testing.assert_array_equal(a.lut[0].astype(np.float32),
                                  lut_of(brute_force_kmeans(W[0].astype(np.float64), d, 4)))
    assert 5.0 in b.lut[0].astype(np.float32)                   # unweighted: 5.0 is its own cluster
    assert not np.array_equal(a.lut, b.lut)


@pytest.mark.parametrize("c", [1.0, 3.7])
def test_equal_weights_equal_unweighted_kmeans_per_row(c):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 40)).astype(np.float32)
    H = c * np.eye(40) + 0.3 * (np.ones((40, 40)) - np.eye(40))   # equal diagonal, off-diagonal ignored
    q = quantize_weight(W, H, "squeezellm", bits=3)
    for r in range(6):
        cents, _ = kmeans1d(W[r].astype(np.float64), 8)           # unweighted
        np.testing.assert_array_equal(q.lut[r].astype(np.float32), lut_of(cents))
    # small row: brute force on all splits agrees with the unweighted DP result
    Ws = W[:, :10]
    qs = quantize_weight(Ws, c * np.eye(10), "squeezellm", bits=2)
    for r in range(6):
        np.testing.assert_array_equal(qs.lut[r].astype(np.float32),
                                      lut_of(brute_force_kmeans(Ws[r].astype(np.float64), np.ones(10), 4)))


def test_iqr_outliers_by_hand():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 32)).astype(np.float32)
    W[1, 3], W[5, 30], W[6, 0] = 9.0, -7.5, 6.0
    H = np.diag(rng.uniform(0.5, 2, 32))
    r = 1.5
    q = quantize_weight(W, H, "squeezellm", bits=3, outlier_iqr=r)
    q1, q3 = np.quantile(W.astype(np.float64), [0.25, 0.75])
    t = max(abs(q1 - r * (q3 - q1)), abs(q3 + r * (q3 - q1)))
    expect = np.abs(W) >= t
    assert expect[1, 3] and expect[5, 30] and expect[6, 0]
    S = q.outliers.to_dense()
    np.testing.assert_array_equal(S != 0, expect & (S != 0))       # S only at outliers
    assert q.info["outliers_iqr"] == expect.sum()
    # outliers are kept: W_hat = lut + fp16(w - lut) ~ w
    deq = q.dequantize()
    assert np.max(np.abs(deq[expect] - W[expect])) < 1e-2
    # each row's table is the k-means of the row WITHOUT its outliers
    for row in (1, 5, 6):
        keep = ~expect[row]
        cents, _ = kmeans1d(W[row, keep].astype(np.float64), 8, weights=np.diag(H)[keep])
        np.testing.assert_array_equal(q.lut[row].astype(np.float32), lut_of(cents))


def test_sensitive_fraction_by_hand():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((10, 20)).astype(np.float32)
    d = rng.uniform(0.5, 2, 20)
    d[7] = 50.0                                                   # the most sensitive column
    frac = 4 / 200                                               # 4 entries: the largest |w| of column 7
    q = quantize_weight(W, np.diag(d), "squeezellm", bits=2, sensitive_frac=frac)
    top = np.argsort(-np.abs(W[:, 7]), kind="stable")[:4]
    expect = np.zeros_like(W, dtype=bool)
    expect[top, 7] = True
    S = q.outliers.to_dense()
    assert np.all(S[~expect] == 0)
    deq = q.dequantize()
    np.testing.assert_allclose(deq[expect], W[expect], rtol=1e-3)


def test_bits_hand_count_and_round_trip():
    rng = np.random.default_rng(6)
    W = (rng.standard_normal((12, 40)) * np.exp(rng.standard_normal((12, 40)))).astype(np.float32)
    H = np.diag(rng.uniform(0.5, 2, 40))
    q = quantize_weight(W, H, "squeezellm", bits=3, outlier_iqr=2.0, sensitive_frac=0.01)
    nnz = q.outliers.nnz
    assert nnz > 0
    bits = 12 * math.ceil(40 * 3 / 8) * 8 + 12 * 8 * 16 + 32 * (12 + 1 + nnz)
    assert q.bits_per_weight == pytest.approx(bits / 480, rel=1e-15)
    assert q.bits_breakdown["codebooks"] == pytest.approx(12 * 8 * 16 / 480)
    back = load_quantized(q.tensors(), q.meta())
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())
    assert q.info["loss"] == pytest.approx(layer_loss(W, q.dequantize(), H), rel=1e-12)
    plain = quantize_weight(W, H, "squeezellm", bits=3)
    assert q.info["loss"] < plain.info["loss"]


def test_deterministic():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((5, 30)).astype(np.float32)
    H = np.diag(rng.uniform(0.5, 2, 30))
    a = quantize_weight(W, H, "squeezellm", outlier_iqr=1.0)
    b = quantize_weight(W, H, "squeezellm", outlier_iqr=1.0)
    for k in a.tensors():
        np.testing.assert_array_equal(a.tensors()[k], b.tensors()[k])


@pytest.mark.parametrize("opt, value, match", [
    ("outlier_iqr", 0, "outlier_iqr"), ("outlier_iqr", -1.5, "outlier_iqr"),
    ("sensitive_frac", 1.0, "sensitive_frac"), ("sensitive_frac", -0.01, "sensitive_frac"),
    ("sensitivity", "gradient", "sensitivity"), ("group_size", 8, "group_size"),
])
def test_option_errors(opt, value, match):
    with pytest.raises(RefqError, match=match) as e:
        quantize_weight(np.ones((2, 8), np.float32), np.eye(8), "squeezellm", **{opt: value})
    assert "\n" not in str(e.value)
