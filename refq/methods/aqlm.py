"""AQLM: additive multi-codebook quantization of a linear layer.

Egiazarian, Panferov, Kuznedelev, Frantar, Babenko, Alistarh, "Extreme
Compression of Large Language Models via Additive Quantization", ICML 2024
(arXiv 2401.06118); reference code Vahe1994/AQLM (src/aq.py, aq_engine.py,
src/beam_search_xtx.py).  Stored in the "additive" format
(refq/formats/additive.py).

Representation (paper §3, "additive quantization" of groups of g weights):
row i of W is cut into K = in/g groups of g inputs, and

    W_hat[i, group k] = s_i * sum_{m<M} C_m[b_ikm]                       (AQ)

with M codebooks C_m of 2^B vectors of length g, codes b_ikm in [0, 2^B) and
one scale s_i per output row.  Written z_i = W_hat[i] / s_i (the unscaled row).

Objective (paper §3, ||W X - W_hat X||², through H = mean x xᵀ):

    L = tr((W - W_hat) H (W - W_hat)ᵀ) = sum_i r_i H r_iᵀ,   r_i = w_i - s_i z_i

It is a sum over rows, so rows never interact except through the shared
codebooks.  The method alternates between two exact block minimizations of L,
after a residual k-means initialization:

0. Init.  s_i = RMS of row i.  Residual k-means on the normalized groups
   w_i[group k] / s_i (Euclidean, like the official code): codebook 0 is the
   k-means of the groups, codebook 1 the k-means of what codebook 0 leaves,
   and so on.  Where a residual has fewer distinct vectors than 2^B, those
   vectors are the first centroids and the rest are seeded perturbations of
   them (the official code crashes there).

1. Codebooks given codes and scales: L is a convex quadratic in the vector θ
   of all codebook entries, θ[(m, c, a)] = C_m[c][a], because
   W_hat[i, k*g + a] = s_i * sum_m θ[(m, b_ikm, a)] is linear in θ.  Its
   gradient vanishes at the normal equations  A θ = y  with

     A[(m,c,a), (m',c',a')] = sum_i s_i² sum_{k,l} [b_ikm = c][b_ilm' = c'] H[kg+a, lg+a']
     y[(m,c,a)]             = sum_i s_i   sum_k   [b_ikm = c] (H w_i)[kg+a]

   (the Hessian-weighted least squares of the paper's codebook phase, which
   the official code approaches with 100 Adam steps per round).  A has
   exactly these entries, so solving it is the exact minimizer: there is
   nothing to tune.  A is singular (a codeword no group uses; with M >= 2,
   adding d to C_0[c] and -d to C_1[c'] for a pair always used together), so
   refq solves the proximal system (A + λI) θ = y + λ θ_old with a tiny λ
   (1e-10 of A's mean diagonal): among the minimizers it takes the one
   nearest the old codebooks, and an unused codeword stays where it was.
   - "direct" (P = M 2^B g <= DIRECT_MAX unknowns, e.g. 2x8 g8: P = 4096):
     build A (parallel over codewords) and solve by Cholesky, A + λI = L Lᵀ,
     in the first round only.  Later rounds start from the old codebooks (a
     very good start: only some codes changed) and take REFINE_ITERS (10)
     conjugate-gradient steps preconditioned by that first-round factor,
     z = (L Lᵀ)⁻¹ r, without forming A again (A applied as for "pcg" below).
     Forming A and factoring it cost O(out in² M²) + P³/3 per round, a
     step out in² + P²; on SmolLM2 layers this loses < 1% of final loss
     against re-factoring every round, at about half the time.  Each step
     lowers L (exact line search), but the round is not the exact minimizer.
   - "pcg" (larger P, e.g. 1x16 g8: P = 524288): A is never formed;
     conjugate gradients with a block-Jacobi preconditioner (the exact g x g
     diagonal block of each codeword), warm-started at the old codebooks.  A
     CG step is an exact line search, so the loss cannot rise; it converges
     to the same minimizer as "direct" (tests/test_aqlm.py checks both
     against numpy's lstsq).
   Then scales given codes and codebooks, one scalar least squares per row:

     s_i = (z_i H w_iᵀ) / (z_i H z_iᵀ)

   Both are rounded to float16 (what the format stores) and the loss is
   recomputed with the rounded values; a step that would raise it (possible
   only through that rounding) is rejected.

2. Codes given codebooks and scales: beam search (paper §3, "beam search"
   phase, code in beam_search_xtx.py) over the groups k (in a seeded random
   order, as the official code) and the codebooks m (ditto), per row, with
   the exact objective including the coupling between groups through H.
   Changing code b_ikm from `old` to c changes group k of the row by
   s_i (C_m[c] - C_m[old]).  With r the row's residual and e_k the rows of
   group k,

     L(c) - L(old) = s_i² (Q[k,m,c] - Q[k,m,old]) - 2 s_i (C_m[c] - C_m[old])ᵀ v
     v       = (H r)_k + s_i H_kk C_m[old]        (H times the residual without `old`)
     Q[k,m,c] = C_m[c]ᵀ H_kk C_m[c]               (precomputed per round, all k, m, c)

   so a candidate costs g multiply-adds.  H r is computed once per round for
   all rows (one BLAS product R H) and updated by H[:, group k] Δŵ (g*in
   multiply-adds) only when a code changes, which after the first rounds is
   rare.  Beam size 1 is
   coordinate descent (the old code competes with Δ = 0, so L cannot rise);
   a wider beam keeps the best `beam_size` partial assignments, always
   including the old codes' branch in the candidate set, so its best member
   cannot be worse either.  Rows are independent: parallel over rows.

Stop when a round (1 + 2) improves L by less than relative_tolerance * L, or
after max_iters rounds.  L never rises from one step to the next (asserted
in debug mode, recorded in info["loss_history"], tested).

Options (CLI flags with dashes): num_codebooks M (2), nbits_per_codebook B
(8), in_group_size g (8), beam_size (1), max_iters (20), relative_tolerance
(0.01), seed (0).  Defaults are "2x8 g8", which fits every linear of small
models; the paper's "1x16 g8" needs at least 2^16 groups (out * in / 8) per
layer, so it is refused on e.g. a 576x576 linear (41,472 groups).

Bits per weight (stored bytes, refq.formats.additive):
    M * 8 * bytes(code) / g  +  M * 2^B * g * 16 / (out * in)  +  16 / in
e.g. 2x8 g8 on 576x576: 2 + 0.198 + 0.028 = 2.226.

Implementation notes
- Everything in float64; codebooks and scales are float16-representable
  after every step.  Numba kernels are parallel only over independent
  outputs (rows, points, codewords), each accumulated in a fixed order, so
  the result does not depend on the number of threads.
- Not done: the paper's block/global fine-tuning after quantization.
"""

import math
import time

import numpy as np
from numba import njit, prange

from refq.errors import RefqError
from refq.options import SEED, Option, defaults

OPTIONS = (
    Option("num_codebooks", "int", 2, "M: codebooks summed per group of weights", range="[1, 64]"),
    Option("nbits_per_codebook", "int", 8, "B: bits per code (2^B vectors per codebook)",
           range="[1, 16]"),
    Option("in_group_size", "int", 8, "g: consecutive input weights coded together",
           range="[1, 64]"),
    Option("beam_size", "int", 1, "candidates kept per step of the code search", range="[1, 1024]"),
    Option("max_iters", "int", 20, "rounds of (codebooks, scales, codes) updates at most",
           range="[1, 10000]"),
    Option("relative_tolerance", "float", 0.01, "stop when a round lowers the loss by less "
           "than this fraction", range="[0, inf)"),
    SEED.but(help="seed of the k-means initialisation and the code-search order (set by "
             "--seed)", common=True),
)
DEFAULTS = defaults(OPTIONS)

DIRECT_MAX = 4096          # largest number of codebook unknowns solved by Cholesky
PCG_MAX_ITERS = 100        # conjugate-gradient steps per codebook update (at most)
REFINE_ITERS = 10          # ... after the first round, when P <= DIRECT_MAX (see step 1)
PCG_RTOL = 1e-8            # ... stopped when the preconditioned residual norm falls by this
KMEANS_MAX_ITERS = 50      # Lloyd iterations of the initialization (at most) ...
KMEANS_WORK = 2e10         # ... fewer when one pass costs more: iterations <= WORK / (N 2^B g)
PROX = 1e-10               # λ of the proximal codebook solve, relative to mean diag(A)
FP16_MAX = 65504.0


def fp16(x):
    """Round to the nearest float16 value (as float64), clipped to the fp16 range."""
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float64)


# ---------------------------------------------------------------------------
# shared small kernels
# ---------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def unscaled_rows(codes, C):
    """z_i = sum_m C_m[b_i·m], the reconstruction before the row scale.

    codes (out, K, M) int64; C (M, nc, g) float64 -> Z (out, K*g) float64
    """
    out, K, M = codes.shape
    g = C.shape[2]
    Z = np.zeros((out, K * g))
    for i in prange(out):                          # rows are independent
        for k in range(K):
            for m in range(M):
                c = codes[i, k, m]
                for a in range(g):
                    Z[i, k * g + a] += C[m, c, a]
    return Z


def row_losses(W, What, H):
    """(w_i - ŵ_i) H (w_i - ŵ_i)ᵀ per row -> (out,) float64."""
    E = W - What                                   # (out, in)
    return np.einsum("ij,ij->i", E @ H, E)


def total_loss(W, H, scales, codes, C):
    return float(np.sum(row_losses(W, scales[:, None] * unscaled_rows(codes, C), H)))


# ---------------------------------------------------------------------------
# 0. initialization: residual k-means (Lloyd) on the normalized groups
# ---------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _assign(X, C, labels):
    """labels[p] = argmin_c ||X[p] - C[c]||² (first on ties).  X (N, g), C (nc, g).

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
    """C[c] = mean of the points labelled c (kept when none); sequential, fixed order."""
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
        _assign(X, C, labels)
        if prev is not None and np.array_equal(prev, labels):
            break
        _centroids(X, labels, C)
        prev = labels.copy()
    _assign(X, C, labels)
    return labels, C


def init_residual_kmeans(W, scales, M, nc, g, rng):
    """-> codes (out, K, M) int64, C (M, nc, g) float64 (float16 values)."""
    out, n = W.shape
    K = n // g
    R = (W / scales[:, None]).reshape(out * K, g)  # (N, g) normalized groups
    codes = np.zeros((out, K, M), dtype=np.int64)
    C = np.zeros((M, nc, g))
    for m in range(M):                             # codebook m fits what 0..m-1 leave
        labels, Cm = kmeans(R, nc, rng)
        C[m] = fp16(Cm)
        codes[:, :, m] = labels.reshape(out, K)
        R = R - C[m][labels]
    return codes, C


# ---------------------------------------------------------------------------
# 1a. codebooks given codes and scales: the normal equations A θ = y
# ---------------------------------------------------------------------------
@njit(cache=True)
def _occurrences(codes, nc):
    """Where each codeword is used: for codeword q = m*nc + c the groups (i, k)
    with b_ikm = c are occ_i[ptr[q]:ptr[q+1]], occ_k[...], in (i, k) order."""
    out, K, M = codes.shape
    ptr = np.zeros(M * nc + 1, dtype=np.int64)
    for i in range(out):
        for k in range(K):
            for m in range(M):
                ptr[m * nc + codes[i, k, m] + 1] += 1
    for q in range(M * nc):
        ptr[q + 1] += ptr[q]
    fill = ptr[:-1].copy()
    occ_i = np.empty(out * K * M, dtype=np.int64)
    occ_k = np.empty(out * K * M, dtype=np.int64)
    for i in range(out):
        for k in range(K):
            for m in range(M):
                q = m * nc + codes[i, k, m]
                occ_i[fill[q]] = i
                occ_k[fill[q]] = k
                fill[q] += 1
    return ptr, occ_i, occ_k


@njit(parallel=True, cache=True)
def _normal_blocks(Hb, codes, s2, ptr, occ_i, occ_k, nc):
    """A in (g, g) blocks: Ab[q, q'] = A[q-block, q'-block] for codewords q = m*nc + c.

    Hb (K, K, g*g): Hb[k, l] = H[k-block, l-block] flattened.  For every use
    (i, k) of codeword q, every group l and codebook m' of the same row:

        Ab[q, (m', b_ilm')] += s_i² H[k-block, l-block]

    Each thread owns the block rows of its codewords q (no shared writes); the
    inner loop is one contiguous run of g*g numbers.
    """
    out, K, M = codes.shape
    gg = Hb.shape[2]
    Ab = np.zeros((M * nc, M * nc, gg))
    for q in prange(M * nc):                       # destination codewords are independent
        for t in range(ptr[q], ptr[q + 1]):
            i = occ_i[t]
            k = occ_k[t]
            w2 = s2[i]
            if w2 == 0.0:
                continue
            for l in range(K):
                for m2 in range(M):
                    q2 = m2 * nc + codes[i, l, m2]
                    for e in range(gg):
                        Ab[q, q2, e] += w2 * Hb[k, l, e]
    return Ab


def normal_matrix(H, codes, scales, nc, g):
    """A (P, P), P = M*nc*g, index (m, c, a) -> (m*nc + c)*g + a (see the docstring)."""
    K, M = codes.shape[1], codes.shape[2]
    ptr, occ_i, occ_k = _occurrences(codes, nc)
    Hb = np.ascontiguousarray(H.reshape(K, g, K, g).transpose(0, 2, 1, 3)).reshape(K, K, g * g)
    Ab = _normal_blocks(Hb, codes, scales * scales, ptr, occ_i, occ_k, nc)   # (nq, nq, g*g)
    nq = M * nc
    return np.ascontiguousarray(Ab.reshape(nq, nq, g, g).transpose(0, 2, 1, 3)).reshape(nq * g, nq * g)


@njit(parallel=True, cache=True)
def _scatter(Y, ptr, occ_i, occ_k, g):
    """Sum the groups of Y that use each codeword: out (M*nc, g), row q = sum over
    (i, k) in occ(q) of Y[i, k-block] (the transpose of `unscaled_rows`)."""
    nq = ptr.shape[0] - 1
    out = np.zeros((nq, g))
    for q in prange(nq):                           # codewords are independent
        for t in range(ptr[q], ptr[q + 1]):
            i = occ_i[t]
            k = occ_k[t]
            for a in range(g):
                out[q, a] += Y[i, k * g + a]
    return out


@njit(parallel=True, cache=True)
def _diagonal_blocks(H, s2, ptr, occ_i, occ_k, g):
    """D[q] = A's (g, g) diagonal block of codeword q: sum over pairs of its uses
    (i, k), (i, l) in the same row of s_i² H[k-block, l-block]."""
    nq = ptr.shape[0] - 1
    D = np.zeros((nq, g, g))
    for q in prange(nq):
        t0 = ptr[q]
        while t0 < ptr[q + 1]:                     # uses are sorted by row: one run per row
            i = occ_i[t0]
            t1 = t0
            while t1 < ptr[q + 1] and occ_i[t1] == i:
                t1 += 1
            for u in range(t0, t1):
                for v in range(t0, t1):
                    k = occ_k[u]
                    l = occ_k[v]
                    for a in range(g):
                        for b in range(g):
                            D[q, a, b] += s2[i] * H[k * g + a, l * g + b]
            t0 = t1
    return D


def normal_cholesky(H, codes, scales, nc, g):
    """Cholesky factor of A + λI -> (scipy cho_factor, λ), or None when it fails.

    λ = PROX * mean diag(A), raised tenfold while rounding makes it indefinite.
    """
    import scipy.linalg
    P = codes.shape[2] * nc * g
    A = normal_matrix(H, codes, scales, nc, g)
    lam = PROX * max(float(np.mean(np.diag(A))), 1e-300)
    for _ in range(6):
        try:
            A[np.diag_indices(P)] += lam
            return scipy.linalg.cho_factor(A, lower=True, overwrite_a=False, check_finite=False), lam
        except np.linalg.LinAlgError:
            lam *= 10                                            # rounding made A indefinite
    return None


def solve_codebooks(W, H, scales, codes, C, solver=None, factor=None, max_iters=PCG_MAX_ITERS):
    """Exact minimizer of L over the codebooks, codes and scales fixed (step 1).

    W (out, in), H (in, in), scales (out,), codes (out, K, M) int64,
    C (M, nc, g) the current codebooks -> (C_new (M, nc, g) float64, solver used).
    factor: for "direct", normal_cholesky of these codes and scales (computed
    when None); for "pcg", an earlier round's one, used as preconditioner
    (None: block-Jacobi).  max_iters caps the PCG steps (a capped run only
    lowers L, it need not reach the minimizer).
    """
    M, nc, g = C.shape
    P = M * nc * g
    solver = solver or ("direct" if P <= DIRECT_MAX else "pcg")
    ptr, occ_i, occ_k = _occurrences(codes, nc)
    s2 = scales * scales
    theta0 = C.reshape(-1)                                       # (P,)
    y = _scatter(scales[:, None] * (W @ H), ptr, occ_i, occ_k, g).reshape(-1)   # y = Σ s_i S_iᵀ H w_i
    if solver == "direct":
        import scipy.linalg
        factor = factor or normal_cholesky(H, codes, scales, nc, g)
        if factor is None:                                       # A + λI never factored
            return C.copy(), solver
        cf, lam = factor                                         # (A + λI) θ = y + λ θ_old
        theta = scipy.linalg.cho_solve(cf, y + lam * theta0, check_finite=False)
        return theta.reshape(M, nc, g), solver

    # preconditioned conjugate gradients on the same system, A applied as
    # A p = Σ_i s_i² S_iᵀ H S_i p  (dequantize p, multiply by H, scatter back)
    def apply_A(p):
        Zp = unscaled_rows(codes, p.reshape(M, nc, g))           # (out, in)
        return _scatter(s2[:, None] * (Zp @ H), ptr, occ_i, occ_k, g).reshape(-1)

    if factor is not None:                                       # an earlier round's Cholesky
        import scipy.linalg

        def precond(r):
            return scipy.linalg.cho_solve(factor[0], r, check_finite=False)
    else:
        D = _diagonal_blocks(H, s2, ptr, occ_i, occ_k, g)       # (M*nc, g, g)
        lam = PROX * max(float(np.mean(np.trace(D, axis1=1, axis2=2))) / g, 1e-300)
        D[:, np.arange(g), np.arange(g)] += lam + 1e-12 * np.abs(D).max(axis=(1, 2))[:, None]
        Dinv = np.linalg.inv(D)                                  # block-Jacobi preconditioner

        def precond(r):
            return np.einsum("qab,qb->qa", Dinv, r.reshape(-1, g)).reshape(-1)

    x = theta0.copy()
    r = y - apply_A(x)                                           # = -gradient / 2
    z = precond(r)
    p = z.copy()
    rz = float(r @ z)
    rz0 = rz
    for _ in range(max_iters):
        if rz <= PCG_RTOL ** 2 * rz0 or rz <= 0:
            break
        Ap = apply_A(p)
        pAp = float(p @ Ap)
        if pAp <= 0:
            break
        alpha = rz / pAp                                         # exact line search along p
        x += alpha * p
        r -= alpha * Ap
        z = precond(r)
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x.reshape(M, nc, g), solver


def solve_scales(W, H, scales, codes, C):
    """s_i = (z_i H w_iᵀ) / (z_i H z_iᵀ): exact per-row minimizer (step 1, scales)."""
    Z = unscaled_rows(codes, C)                                  # (out, in)
    ZH = Z @ H
    num = np.einsum("ij,ij->i", ZH, W)
    den = np.einsum("ij,ij->i", ZH, Z)
    ok = den > 0
    s = scales.copy()
    s[ok] = num[ok] / den[ok]
    return s


# ---------------------------------------------------------------------------
# 2. codes given codebooks and scales: beam search per row
# ---------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def codebook_quadratics(H, C, K):
    """Q[k, m, c] = C_m[c]ᵀ H_kk C_m[c] for every group k -> (K, M, nc)."""
    M, nc, g = C.shape
    Q = np.zeros((K, M, nc))
    for k in prange(K):                            # groups are independent
        k0 = k * g
        for m in range(M):
            for c in range(nc):
                acc = 0.0
                for a in range(g):
                    t = 0.0
                    for b in range(g):
                        t += H[k0 + a, k0 + b] * C[m, c, b]
                    acc += C[m, c, a] * t
                Q[k, m, c] = acc
    return Q


@njit(cache=True)
def _insert(topL, topB, topC, ntop, Lc, b, c):
    """Insert candidate (loss Lc, parent beam b, code c) into the sorted best list
    (ascending, at most len(topL) entries; on ties the earlier candidate stays
    first) -> new length."""
    nbeam = topL.shape[0]
    if ntop == nbeam and not Lc < topL[ntop - 1]:
        return ntop
    pos = min(ntop, nbeam - 1)
    while pos > 0 and topL[pos - 1] > Lc:
        topL[pos] = topL[pos - 1]
        topB[pos] = topB[pos - 1]
        topC[pos] = topC[pos - 1]
        pos -= 1
    topL[pos] = Lc
    topB[pos] = b
    topC[pos] = c
    return min(ntop + 1, nbeam)


@njit(cache=True)
def _search_row(r0, hr0, H, s, C, CT, Q, codes_row, group_order, book_order, beam_size):
    """Beam search for one row -> (best codes (K, M), their loss).

    r0 (in,) the row's residual w - s z and hr0 = H r0 (in,) for the current
    codes codes_row (K, M); s the row scale; C (M, nc, g), CT (M, g, nc) = C
    transposed; Q (K, M, nc).
    """
    n = r0.shape[0]
    M, nc, g = C.shape
    K = codes_row.shape[0]
    nbeam = beam_size
    # state of each beam: residual r, Hr = H r, codes, loss; *2 = the next beam
    R = np.zeros((nbeam, n))
    HR = np.zeros((nbeam, n))
    B = np.zeros((nbeam, K, M), dtype=np.int64)
    L = np.zeros(nbeam)
    L2 = np.zeros(nbeam)
    if nbeam == 1:                                 # beam 1: parent 0 -> beam 0, in place
        R2, HR2, B2 = R, HR, B
    else:
        R2 = np.zeros((nbeam, n))
        HR2 = np.zeros((nbeam, n))
        B2 = np.zeros((nbeam, K, M), dtype=np.int64)
    R[0] = r0
    HR[0] = hr0
    B[0] = codes_row
    L0 = 0.0
    for j in range(n):                             # L = r H rᵀ
        L0 += r0[j] * hr0[j]
    L[0] = L0
    cnt = 1                                        # beams alive
    if s == 0.0:                                   # a zero row: every code is as good
        return codes_row.copy(), L0

    BLK = 1024
    buf = np.empty(BLK)
    u = np.empty(g)
    topL = np.empty(nbeam)
    topB = np.empty(nbeam, dtype=np.int64)
    topC = np.empty(nbeam, dtype=np.int64)
    delta = np.empty(g)
    s2 = s * s
    for k in group_order:
        k0 = k * g
        for m in book_order:
            ntop = 0
            for b in range(cnt):                   # the old codes first: on a tie, keeping wins
                ntop = _insert(topL, topB, topC, ntop, L[b], b, B[b, k, m])
            for b in range(cnt):
                old = B[b, k, m]
                # v = (H r')_k with r' = r + s e_k C_m[old] (the residual without the old
                # code); u = 2 v / s.  score(c) = Q[k,m,c] - C_m[c]ᵀ u and
                # L(c) - L(old) = s² (score(c) - score(old))
                for a in range(g):
                    t = 0.0
                    for a2 in range(g):
                        t += H[k0 + a, k0 + a2] * C[m, old, a2]
                    u[a] = 2.0 * (HR[b, k0 + a] + s * t) / s
                sold = Q[k, m, old]
                for a in range(g):
                    sold -= C[m, old, a] * u[a]
                for c0 in range(0, nc, BLK):       # candidates in blocks of BLK codes
                    c1 = min(nc, c0 + BLK)
                    for c in range(c0, c1):
                        buf[c - c0] = Q[k, m, c]
                    for a in range(g):
                        ua = u[a]
                        for c in range(c0, c1):
                            buf[c - c0] -= ua * CT[m, a, c]
                    for c in range(c0, c1):
                        Lc = L[b] + s2 * (buf[c - c0] - sold)
                        if c != old and (ntop < nbeam or Lc < topL[ntop - 1]):
                            ntop = _insert(topL, topB, topC, ntop, Lc, b, c)
            # the next beam: each winner = its parent with one code changed
            for t in range(ntop):
                pb = topB[t]
                c = topC[t]
                old = B[pb, k, m]
                if nbeam > 1:
                    R2[t] = R[pb]
                    HR2[t] = HR[pb]
                    B2[t] = B[pb]
                L2[t] = topL[t]
                if c != old:
                    for a in range(g):
                        delta[a] = s * (C[m, c, a] - C[m, old, a])   # Δŵ of group k
                        R2[t, k0 + a] -= delta[a]                   # r -= Δŵ
                    for a in range(g):                              # Hr -= H[:, k-block] Δŵ
                        da = delta[a]
                        for j in range(n):
                            HR2[t, j] -= H[k0 + a, j] * da
                    B2[t, k, m] = c
            R, R2 = R2, R
            HR, HR2 = HR2, HR
            B, B2 = B2, B
            L, L2 = L2, L
            cnt = ntop
    return B[0].copy(), L[0]


@njit(parallel=True, cache=True)
def beam_search(R, HR, H, scales, C, Q, codes, group_order, book_order, beam_size):
    """New codes (out, K, M) for every row (rows in parallel) and the rows' losses.

    R (out, in) residuals W - W_hat of the current codes, HR = R H (out, in).
    """
    out = R.shape[0]
    M, nc, g = C.shape
    CT = np.empty((M, g, nc))
    for m in range(M):
        CT[m] = C[m].T
    new = np.empty_like(codes)
    loss = np.empty(out)
    for i in prange(out):                          # rows are independent
        best, best_loss = _search_row(R[i], HR[i], H, scales[i], C, CT, Q, codes[i],
                                      group_order, book_order, beam_size)
        new[i] = best
        loss[i] = best_loss
    return new, loss


def code_step(W, H, scales, codes, C, beam_size, rng):
    """Step 2 for all rows, groups and codebooks visited in a seeded random order."""
    K, M = codes.shape[1], codes.shape[2]
    group_order = rng.permutation(K).astype(np.int64)
    book_order = rng.permutation(M).astype(np.int64)
    Q = codebook_quadratics(H, C, K)                             # (K, M, nc)
    R = W - scales[:, None] * unscaled_rows(codes, C)            # (out, in) residuals
    new, _ = beam_search(R, R @ H, H, scales, C, Q, codes, group_order, book_order, beam_size)
    return new


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def _check_monotone(prev, new, what, name):
    # debug-mode assertion (python -O removes it): no step may raise the loss
    assert new <= prev * (1 + 1e-9) + 1e-300, \
        f"aqlm {name}: loss rose in {what}: {prev!r} -> {new!r}"


def check_shape(shape, opts, name=""):
    """RefqError (one line) when the layer cannot take these options."""
    prefix = f"{name}: " if name else ""
    out, n = shape
    M, B, g = opts["num_codebooks"], opts["nbits_per_codebook"], opts["in_group_size"]
    if n % g:
        raise RefqError(f"{prefix}in_features {n} is not divisible by in_group_size {g} "
                        f"(--in-group-size)")
    groups = out * (n // g)
    if 2 ** B > groups:
        raise RefqError(f"{prefix}a {B}-bit codebook has {2 ** B} codes but this {out}x{n} layer "
                        f"has only {groups} groups of {g} weights; use fewer bits per codebook "
                        f"(--nbits-per-codebook <= {int(math.log2(groups))}, e.g. 2x8 instead of 1x16)")


def quantize_aqlm(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 (mean x xᵀ) -> AdditiveWeight."""
    from refq.formats.additive import AdditiveWeight

    tick = time.perf_counter()
    check_shape(W.shape, opts, name)
    M, B, g = opts["num_codebooks"], opts["nbits_per_codebook"], opts["in_group_size"]
    nc = 2 ** B
    rng = np.random.default_rng(opts["seed"])
    W = np.ascontiguousarray(W, dtype=np.float64)                # (out, in)
    H = np.ascontiguousarray(H, dtype=np.float64)                # (in, in)

    rms = np.sqrt(np.mean(W * W, axis=1))                        # (out,)
    scales = fp16(np.where(rms > 0, rms, 1.0))
    scales[scales == 0] = 1.0                                    # rms below fp16's range
    codes, C = init_residual_kmeans(W, scales, M, nc, g, rng)    # (out, K, M), (M, nc, g)
    loss = total_loss(W, H, scales, codes, C)
    history = [loss]
    P = M * nc * g                                               # codebook unknowns
    solver = "direct" if P <= DIRECT_MAX else "pcg"
    factor = None
    iters = 0
    for iters in range(1, opts["max_iters"] + 1):
        start = loss
        # 1. codebooks (exact, or warm PCG steps), then scales (exact), rounded to fp16
        if P > DIRECT_MAX:                                       # block-Jacobi PCG, converged
            C_new, _ = solve_codebooks(W, H, scales, codes, C, "pcg")
        elif factor is None:
            factor = normal_cholesky(H, codes, scales, nc, g)    # exact solve, factor kept
            C_new, _ = solve_codebooks(W, H, scales, codes, C, "direct", factor=factor)
        else:                                                    # warm PCG, round 1's factor
            C_new, _ = solve_codebooks(W, H, scales, codes, C, "pcg", factor=factor,
                                       max_iters=REFINE_ITERS)
        C_new = fp16(C_new)
        s_new = fp16(solve_scales(W, H, scales, codes, C_new))
        loss_a = total_loss(W, H, s_new, codes, C_new)
        if loss_a <= loss:                                       # else: fp16 rounding lost
            C, scales, loss = C_new, s_new, loss_a               # more than the solve won
        history.append(loss)
        # 2. codes: beam search with the exact objective
        codes = code_step(W, H, scales, codes, C, opts["beam_size"], rng)
        loss_b = total_loss(W, H, scales, codes, C)
        _check_monotone(loss, loss_b, "the code step", name)
        loss = loss_b
        history.append(loss)
        if start - loss <= opts["relative_tolerance"] * start:
            break

    info = {"name": name, "loss": loss, "iterations": iters, "codebook_solver": solver,
            "loss_history": [float(v) for v in history]}
    qw = AdditiveWeight.from_arrays(codes, C, scales, B, method="aqlm", options=opts, info=info)
    qw.info["seconds"] = time.perf_counter() - tick
    return qw
