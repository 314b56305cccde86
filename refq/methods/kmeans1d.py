"""Optimal 1-D k-means by dynamic programming (and Lloyd's algorithm, for comparison).

Used by CLAQ (one codebook per column of W) and SqueezeLLM (one weighted
codebook per row).  In one dimension k-means need not be solved by heuristics:
the clusters of an optimal solution are contiguous runs of the SORTED values,
so the optimum is a shortest path over split points (Wang & Song, "Ckmeans.1d.dp:
Optimal k-means clustering in one dimension by dynamic programming", The R
Journal 2011; Grønlund et al., "Fast exact k-means, k-medians and Bregman
divergence clustering in 1D", 2017).

Objective, values x_1..x_n with weights w_t >= 0 (w = 1: plain k-means):

    min over centroids c_1..c_k and labels l(t):   Σ_t w_t (x_t - c_l(t))²

With the values sorted and merged into distinct values (equal values always
share a cluster in some optimum, and merging adds their weights), the cost of
one cluster holding sorted values [i, j) is, from prefix sums
P0 = Σ w, P1 = Σ w x, P2 = Σ w x² (half-open, O(1) per query):

    cost(i, j) = (P2[j] - P2[i]) - (P1[j] - P1[i])² / (P0[j] - P0[i])      (1)

and its optimal centroid is the weighted mean (P1[j] - P1[i]) / (P0[j] - P0[i]).
The DP over "the first j values in m+1 clusters":

    D[0][j] = cost(0, j)
    D[m][j] = min_{m <= i < j}  D[m-1][i] + cost(i, j)                     (2)

cost satisfies the quadrangle inequality, so the optimal split opt_m(j) is
non-decreasing in j: each row m of (2) is solved by divide and conquer
(solve the middle j, then the left half searches i <= opt(mid) and the right
half i >= opt(mid)), O(n log n) per row.  It is also non-decreasing in m (one
more cluster never starts the last one earlier: Wang & Song), so opt_{m-1}(j)
bounds the search from below as well.  The last row needs one cell only,
D[k-1][n] (the backtrack starts there): it is a single O(n) scan.  In all
O((k-2) n log n + n) time and O(k n) memory; on real weight columns each cell
scans 5-10 candidate i on average (alternatives measured and not kept:
BENCHMARKS.md, issue 21 section).

Determinism: ties in (2) keep the smallest i, so the result depends only on
the values (and weights), never on their order or on thread counts.

Edge cases: n distinct values < k -> every distinct value is its own centroid
and the remaining centroids repeat the largest one (a codebook always has k
entries, codes never use the repeats); a constant column -> k copies of the
value; weights all zero -> treated as all one.
"""

import numpy as np
from numba import njit

from refq.errors import RefqError


# ---------------------------------------------------------------------------
# numba core: DP on distinct sorted values with weights
# ---------------------------------------------------------------------------
@njit(cache=True)
def _seg_cost(P0, P1, P2, i, j):
    """cost of one cluster holding distinct values [i, j): eq. (1)."""
    s0 = P0[j] - P0[i]
    if s0 <= 0.0:
        return 0.0
    s1 = P1[j] - P1[i]
    c = (P2[j] - P2[i]) - s1 * s1 / s0
    return c if c > 0.0 else 0.0         # rounding can leave a tiny negative


@njit(cache=True, inline="always")
def _best_split(Dprev, P0, P1, P2, j, i0, i1):
    """(min, leftmost argmin) over i in [i0, i1] of Dprev[i] + cost(i, j): one cell of eq. (2).
    Inlined into its callers (a call per cell costs more than the few i it scans)."""
    best = np.inf
    arg = i0
    for i in range(i0, i1 + 1):
        v = Dprev[i] + _seg_cost(P0, P1, P2, i, j)      # eq. (2)
        if v < best:
            best = v
            arg = i
    return best, arg


@njit(cache=True)
def _fill_row(Dprev, Tprev, Dcur, Tcur, P0, P1, P2, m, jlo, jhi, ilo, ihi):
    """Dcur[j] = min_{i in [max(ilo, m, Tprev[j]), min(ihi, j-1)]} Dprev[i] + cost(i, j) for
    j in [jlo, jhi], by divide and conquer over j (opt(j) is monotone).  Iterative, with an
    explicit stack."""
    stack = np.empty((64, 4), dtype=np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = jlo, jhi, ilo, ihi
    top = 1
    while top > 0:
        top -= 1
        a, b, lo, hi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        if a > b:
            continue
        j = (a + b) // 2
        i0 = max(lo, m, Tprev[j])                          # opt is monotone in j and in m
        i1 = hi if hi < j - 1 else j - 1
        best, arg = _best_split(Dprev, P0, P1, P2, j, i0, i1)
        Dcur[j] = best
        Tcur[j] = arg
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = a, j - 1, lo, arg
        top += 1
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = j + 1, b, arg, hi
        top += 1


@njit(cache=True)
def kmeans_dp_sorted(xu, wu, k):
    """Optimal k-means of DISTINCT ascending values xu (d,) with weights wu (d,) > 0 or >= 0.

    k <= d.  -> (centroids (k,) ascending float64, starts (k + 1,) int64): cluster m
    holds xu[starts[m]:starts[m+1]].
    """
    d = xu.shape[0]
    shift = xu[d // 2]                                   # centring keeps (1) accurate
    P0 = np.zeros(d + 1)
    P1 = np.zeros(d + 1)
    P2 = np.zeros(d + 1)
    for t in range(d):
        y = xu[t] - shift
        P0[t + 1] = P0[t] + wu[t]
        P1[t + 1] = P1[t] + wu[t] * y
        P2[t + 1] = P2[t] + wu[t] * y * y
    D = np.empty((k, d + 1))
    T = np.zeros((k, d + 1), dtype=np.int64)
    for j in range(d + 1):
        D[0, j] = _seg_cost(P0, P1, P2, 0, j)
    for m in range(1, k - 1):
        for j in range(m + 1):
            D[m, j] = np.inf
        _fill_row(D[m - 1], T[m - 1], D[m], T[m], P0, P1, P2, m, m + 1, d, m, d - 1)
    if k > 1:                                            # last row: only the cell j = d
        m = k - 1
        D[m, d], T[m, d] = _best_split(D[m - 1], P0, P1, P2, d, max(m, T[m - 1, d]), d - 1)
    starts = np.empty(k + 1, dtype=np.int64)             # backtrack the split points
    starts[k] = d
    j = d
    for m in range(k - 1, 0, -1):
        j = T[m, j]
        starts[m] = j
    starts[0] = 0
    cents = np.empty(k)
    for m in range(k):
        i, j = starts[m], starts[m + 1]
        s0 = P0[j] - P0[i]
        if s0 > 0.0:
            cents[m] = (P1[j] - P1[i]) / s0 + shift      # weighted mean of the cluster
        else:                                            # zero total weight: plain mean
            acc = 0.0
            for t in range(i, j):
                acc += xu[t]
            cents[m] = acc / (j - i)
    return cents, starts


@njit(cache=True)
def kmeans1d_centroids(x, k):
    """All-numba path for unweighted values (CLAQ's columns): x (n,) float64 -> (k,)
    ascending optimal centroids (distinct values < k: padded with the largest), the same
    numbers as kmeans1d(x, k)[0].  Sorting and merging of equal values happen here too,
    so a call costs the DP alone, without Python overhead."""
    xs = np.sort(x)
    n = xs.shape[0]
    xu = np.empty(n)
    wu = np.empty(n)
    d = 0
    for t in range(n):                                   # merge equal values, count them
        if d > 0 and xs[t] == xu[d - 1]:
            wu[d - 1] += 1.0
        else:
            xu[d] = xs[t]
            wu[d] = 1.0
            d += 1
    cents = np.empty(k)
    if d <= k:
        for m in range(k):
            cents[m] = xu[m] if m < d else xu[d - 1]
        return cents
    c, _ = kmeans_dp_sorted(xu[:d], wu[:d], k)
    return c


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _prepare(values, weights, what):
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise RefqError(f"{what}: no values to cluster")
    if not np.all(np.isfinite(x)):
        raise RefqError(f"{what}: values contain NaN/Inf")
    if weights is None:
        w = np.ones_like(x)
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != x.shape:
            raise RefqError(f"{what}: weights have shape {w.shape}, values {x.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise RefqError(f"{what}: weights must be finite and >= 0")
        if not np.any(w > 0):
            w = np.ones_like(x)
    return x, w


def _merge_distinct(x, w):
    """-> distinct ascending values xu (d,), summed weights wu (d,), inverse index (n,)."""
    xu, inv = np.unique(x, return_inverse=True)
    wu = np.bincount(inv, weights=w, minlength=xu.size)
    return xu, wu, inv


def kmeans1d(values, k, weights=None, method="dp", max_iter=300, what="kmeans1d"):
    """Cluster 1-D values into k centroids.

    values  (n,) float; weights (n,) >= 0 or None; k >= 1
    method  "dp": the exact optimum (default); "lloyd": Lloyd's algorithm from
            weighted-quantile starting centroids (a local optimum, for comparison)
    -> (centroids (k,) float64 ascending, labels (n,) int64 in [0, k))
       labels[t] is the cluster of values[t]; equal values get equal labels.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise RefqError(f"{what}: k must be a positive integer, got {k!r}")
    x, w = _prepare(values, weights, what)
    xu, wu, inv = _merge_distinct(x, w)
    d = xu.size
    if d <= k:                                           # every distinct value is a centroid
        cents = np.concatenate([xu, np.full(k - d, xu[-1])])
        return cents, inv.astype(np.int64)
    if method == "dp":
        cents, starts = kmeans_dp_sorted(xu, wu, int(k))
        lab_u = np.repeat(np.arange(k), np.diff(starts))  # (d,) cluster of each distinct value
    elif method == "lloyd":
        cents, lab_u = _lloyd(xu, wu, int(k), max_iter)
    else:
        raise RefqError(f"{what}: method must be 'dp' or 'lloyd', got {method!r}")
    return cents, lab_u[inv].astype(np.int64)


def kmeans_cost(values, centroids, labels, weights=None):
    """Σ_t w_t (x_t - c_{l(t)})²  in float64."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    return float(np.sum(w * (x - np.asarray(centroids, np.float64)[labels]) ** 2))


def nearest_centroid(values, centroids):
    """(n,) values, (k,) ASCENDING centroids -> (n,) int64 index of the nearest centroid
    (ties go to the lower centroid)."""
    c = np.asarray(centroids, dtype=np.float64)
    mids = (c[1:] + c[:-1]) / 2                            # decision boundaries
    return np.searchsorted(mids, np.asarray(values, dtype=np.float64), side="left").astype(np.int64)


def _lloyd(xu, wu, k, max_iter):
    """Weighted Lloyd iterations on distinct sorted values (a local optimum)."""
    cw = np.cumsum(wu)
    q = (np.arange(k) + 0.5) / k * cw[-1]                  # weighted quantiles as the start
    cents = xu[np.minimum(np.searchsorted(cw, q), xu.size - 1)].astype(np.float64)
    lab = nearest_centroid(xu, cents)
    for _ in range(max_iter):
        s0 = np.bincount(lab, weights=wu, minlength=k)
        s1 = np.bincount(lab, weights=wu * xu, minlength=k)
        new = np.where(s0 > 0, s1 / np.where(s0 > 0, s0, 1), cents)   # empty cluster: keep
        new = np.sort(new)
        lab_new = nearest_centroid(xu, new)
        done = np.array_equal(lab_new, lab) and np.array_equal(new, cents)
        cents, lab = new, lab_new
        if done:
            break
    return cents, lab
