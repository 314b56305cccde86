"""Lloyd's k-means of vectors (Euclidean), for AQLM's initialization.

The vector counterpart of refq.methods.kmeans1d (exact 1-D k-means by dynamic
programming): in g > 1 dimensions no exact algorithm is practical, so this is
Lloyd's alternation from a seeded start,

    assign:    label(p) = argmin_c ||x_p - C[c]||²                          (1)
    update:    C[c]     = mean of the points labelled c (kept when none)    (2)

until the labels stop changing or after at most KMEANS_MAX_ITERS rounds
(fewer when one round costs more than KMEANS_WORK multiply-adds:
iterations <= WORK / (N nc g), at least 3).

Start: nc distinct points drawn by the seeded rng (from np.unique's sorted
list, so the draw does not depend on the order of X).  Where X has fewer
distinct vectors than nc, those vectors are the first centroids and the rest
are seeded perturbations of them (the official AQLM code crashes there).

Deterministic: (1) is parallel over points, each point's sums in a fixed
order; (2) is sequential.  The result does not depend on the thread count.
"""

import numpy as np
from numba import njit, prange

KMEANS_MAX_ITERS = 50      # Lloyd iterations (at most) ...
KMEANS_WORK = 2e10         # ... fewer when one pass costs more: iterations <= WORK / (N nc g)


@njit(parallel=True, cache=True)
def _assign(X, C, labels):
    """labels[p] = argmin_c ||X[p] - C[c]||² (first on ties), eq. (1).  X (N, g), C (nc, g).

    Points go 4 at a time through each row of Cᵀ (loaded once for the 4);
    every point's sums keep the same order, so the labels do not depend on it.
    """
    N, g = X.shape
    nc = C.shape[0]
    CT = np.ascontiguousarray(C.T)                 # (g, nc): the inner loop runs over c
    cn = np.zeros(nc)                              # ||C[c]||²
    for c in range(nc):
        for a in range(g):
            cn[c] += C[c, a] * C[c, a]
    NP = 4
    chunk = 64
    for p0 in prange((N + chunk - 1) // chunk):    # points are independent
        buf = np.empty((NP, nc))
        end = min(N, (p0 + 1) * chunk)
        for p in range(p0 * chunk, end, NP):
            npt = min(NP, end - p)
            for j in range(npt):                   # ||x - c||² - ||x||² = ||c||² - 2 xᵀc
                for c in range(nc):
                    buf[j, c] = cn[c]
            for a in range(g):
                for j in range(npt):
                    xa = 2.0 * X[p + j, a]
                    for c in range(nc):
                        buf[j, c] -= xa * CT[a, c]
            for j in range(npt):
                best = np.inf
                bi = 0
                for c in range(nc):
                    if buf[j, c] < best:
                        best = buf[j, c]
                        bi = c
                labels[p + j] = bi


@njit(cache=True)
def _centroids(X, labels, C):
    """C[c] = mean of the points labelled c (kept when none), eq. (2); sequential, fixed order."""
    nc, g = C.shape
    S = np.zeros((nc, g))
    cnt = np.zeros(nc, dtype=np.int64)
    for p in range(X.shape[0]):
        c = labels[p]
        cnt[c] += 1
        for a in range(g):
            S[c, a] += X[p, a]
    for c in range(nc):
        if cnt[c] > 0:
            for a in range(g):
                C[c, a] = S[c, a] / cnt[c]


def kmeans(X, nc, rng):
    """Lloyd's k-means of X (N, g) into nc centroids -> (labels (N,) int64, C (nc, g))."""
    N, g = X.shape
    distinct = np.unique(X, axis=0)                # (D, g) sorted, so the draw below is
    D = distinct.shape[0]                          # independent of the order of X
    if D >= nc:
        C = distinct[np.sort(rng.choice(D, nc, replace=False))].copy()
    else:                                          # fewer distinct vectors than codes:
        extra = distinct[rng.integers(0, D, nc - D)]   # perturbed copies fill the rest
        spread = np.std(X) if np.std(X) > 0 else 1.0
        C = np.concatenate([distinct, extra + 1e-3 * spread * rng.standard_normal(extra.shape)])
    labels = np.zeros(N, dtype=np.int64)
    iters = int(max(3, min(KMEANS_MAX_ITERS, KMEANS_WORK // max(1, N * nc * g))))
    prev = None
    for _ in range(iters):
        _assign(X, C, labels)                      # (1)
        if prev is not None and np.array_equal(prev, labels):
            break
        _centroids(X, labels, C)                   # (2)
        prev = labels.copy()
    _assign(X, C, labels)
    return labels, C
