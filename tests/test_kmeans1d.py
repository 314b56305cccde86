"""Exact 1-D k-means (refq/methods/kmeans1d.py) against brute force."""
import itertools

import numpy as np
import pytest

from refq.errors import RefqError
from refq.methods.kmeans1d import kmeans1d, kmeans1d_centroids, kmeans_cost, nearest_centroid


def brute_force(x, k, w=None):
    """Min over every partition of the sorted values into k contiguous runs (independent of
    the DP: enumerates all C(n-1, k-1) split sets, centroids = weighted means)."""
    x = np.asarray(x, float)
    w = np.ones_like(x) if w is None else np.asarray(w, float)
    o = np.argsort(x, kind="stable")
    xs, ws = x[o], w[o]
    n = len(xs)
    best = np.inf
    for splits in itertools.combinations(range(1, n), k - 1):
        b = (0,) + splits + (n,)
        c = 0.0
        for i, j in zip(b[:-1], b[1:]):
            sw = ws[i:j].sum()
            mu = (ws[i:j] * xs[i:j]).sum() / sw if sw > 0 else xs[i:j].mean()
            c += (ws[i:j] * (xs[i:j] - mu) ** 2).sum()
        best = min(best, c)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(5, 11), rng.integers(2, 5)
    x = rng.standard_t(3, size=n)
    c, lab = kmeans1d(x, k)
    assert np.all(np.diff(c) >= 0)
    assert kmeans_cost(x, c, lab) == pytest.approx(brute_force(x, k), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_weighted_dp_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n, k = rng.integers(5, 11), rng.integers(2, 5)
    x, w = rng.normal(size=n), rng.exponential(size=n)
    c, lab = kmeans1d(x, k, weights=w)
    assert kmeans_cost(x, c, lab, w) == pytest.approx(brute_force(x, k, w), rel=1e-10, abs=1e-12)


def test_labels_are_the_nearest_centroid_and_centroids_are_means():
    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    c, lab = kmeans1d(x, 8)
    np.testing.assert_array_equal(lab, nearest_centroid(x, c))         # optimal => Voronoi
    for m in range(8):
        assert c[m] == pytest.approx(x[lab == m].mean(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_dp_never_worse_than_lloyd(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=300), rng.normal(8, 0.1, size=5)])
    w = rng.exponential(size=x.size)
    for k in (4, 8, 16):
        for ww in (None, w):
            c, lab = kmeans1d(x, k, weights=ww)
            cl, labl = kmeans1d(x, k, weights=ww, method="lloyd")
            assert kmeans_cost(x, c, lab, ww) <= kmeans_cost(x, cl, labl, ww) * (1 + 1e-12)


def test_dp_never_worse_than_sklearn():
    sk = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(3)
    x = rng.standard_t(4, size=400)
    for k in (4, 16):
        c, lab = kmeans1d(x, k)
        km = sk.KMeans(n_clusters=k, random_state=10, n_init="auto").fit(x.reshape(-1, 1))
        assert kmeans_cost(x, c, lab) <= km.inertia_ * (1 + 1e-9)


def test_weights_of_one_equal_unweighted_and_scale_free():
    x = np.random.default_rng(2).normal(size=200)
    c1, l1 = kmeans1d(x, 8)
    c2, l2 = kmeans1d(x, 8, weights=np.full(200, 3.5))
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(c1, c2, rtol=1e-12, atol=1e-14)


def test_order_independent_and_ties_share_a_label():
    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=300), 1)                  # many ties
    c, lab = kmeans1d(x, 8)
    p = rng.permutation(300)
    c2, lab2 = kmeans1d(x[p], 8)
    np.testing.assert_array_equal(c, c2)
    np.testing.assert_array_equal(lab[p], lab2)
    for v in np.unique(x):
        assert len(set(lab[x == v])) == 1


def test_fewer_distinct_values_than_k():
    c, lab = kmeans1d([1.0, 1.0, 5.0], 4)
    np.testing.assert_array_equal(c, [1.0, 5.0, 5.0, 5.0])
    np.testing.assert_array_equal(c[lab], [1.0, 1.0, 5.0])
    c, lab = kmeans1d(np.full(10, -2.5), 16)               # constant column
    assert np.all(c == -2.5) and np.all(c[lab] == -2.5)
    c, lab = kmeans1d([3.0, -1.0], 2)                     # n == k
    np.testing.assert_array_equal(c, [-1.0, 3.0])
    np.testing.assert_array_equal(lab, [1, 0])


def test_one_cluster_is_the_weighted_mean():
    x, w = np.array([0.0, 1.0, 4.0]), np.array([1.0, 1.0, 2.0])
    c, lab = kmeans1d(x, 1, weights=w)
    assert c[0] == pytest.approx(9.0 / 4.0) and np.all(lab == 0)


def test_large_offset_is_accurate():
    x = 1e6 + np.random.default_rng(5).normal(size=100) * 1e-3
    c, lab = kmeans1d(x, 4)
    assert kmeans_cost(x, c, lab) <= kmeans_cost(x, *kmeans1d(x, 4, method="lloyd")) * (1 + 1e-6)


@pytest.mark.parametrize("args, match", [
    (([], 2), "no values"),
    (([1.0, np.nan], 2), "NaN"),
    (([1.0, 2.0], 0), "positive integer"),
    (([1.0, 2.0], 2, [1.0, -1.0]), ">= 0"),
    (([1.0, 2.0], 2, [1.0]), "shape"),
])
def test_bad_input(args, match):
    with pytest.raises(RefqError, match=match):
        kmeans1d(*args)


@pytest.mark.parametrize("x, k", [
    (np.random.default_rng(7).normal(size=300), 8),
    (np.round(np.random.default_rng(8).normal(size=200), 1), 16),   # ties
    (np.array([2.0, 2.0, -1.0]), 4),                                # fewer distinct than k
    (np.full(5, 0.0), 4),                                           # constant (zero) column
])
def test_numba_centroids_equal_the_api(x, k):
    np.testing.assert_array_equal(kmeans1d_centroids(x, k), kmeans1d(x, k)[0])
