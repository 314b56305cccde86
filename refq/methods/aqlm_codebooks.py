"""AQLM's codebook and scale updates: the normal equations, Cholesky, PCG.

Notation of refq.methods.aqlm: W (out, in), H = mean x xᵀ (in, in); row i of
W_hat is s_i z_i with z_i = Σ_m C_m[b_i·m] (unscaled_rows), codes b (out, K, M),
codebooks C (M, nc, g), K = in/g groups per row, nc = 2^B codewords.

Codebooks given codes and scales (AQLM step 1).  The loss
L = Σ_i (w_i - s_i z_i) H (w_i - s_i z_i)ᵀ is a convex quadratic in the vector
θ of all codebook entries, θ[(m, c, a)] = C_m[c][a] (P = M nc g unknowns),
because z_i = S_i θ is linear in θ (S_i picks the codewords of row i).  Its
gradient vanishes at the normal equations A θ = y:

    A[(m,c,a), (m',c',a')] = Σ_i s_i² Σ_{k,l} [b_ikm = c][b_ilm' = c'] H[kg+a, lg+a']    (N1)
    y[(m,c,a)]             = Σ_i s_i   Σ_k   [b_ikm = c] (H w_i)[kg+a]                    (N2)

(the Hessian-weighted least squares of the paper's codebook phase, which the
official code approaches with Adam steps).  A is singular (a codeword no group
uses; with M >= 2, adding d to C_0[c] and -d to C_1[c'] for a pair always used
together), so the system solved is the proximal one

    (A + λI) θ = y + λ θ_old,      λ = PROX · mean diag(A)                             (N3)

which, among the minimizers, takes the one nearest the old codebooks (an
unused codeword stays where it was).  Two solvers:

- "direct" (P <= DIRECT_MAX): form A (normal_matrix, parallel over codewords)
  and factor A + λI = L Lᵀ (normal_cholesky); θ = (L Lᵀ)⁻¹ (y + λ θ_old).
- "pcg": conjugate gradients on (N3) without forming A, A p applied as
  Σ_i s_i² S_iᵀ H S_i p (dequantize p, multiply by H, scatter back), warm-started
  at θ_old, preconditioned by either an earlier round's Cholesky factor or the
  block-Jacobi (g x g diagonal blocks of A, _diagonal_blocks).  Each step is an
  exact line search, so L cannot rise; run to PCG_RTOL it reaches the same
  minimizer as "direct" (tests/test_aqlm.py checks both against lstsq).

update_codebooks is the one place that picks the solver for a round:

    P > DIRECT_MAX          -> "pcg", block-Jacobi, up to PCG_MAX_ITERS steps
    first round, P small    -> "direct": form A, factor it, keep the factor
    later rounds, P small   -> "pcg" warm-started at the old codebooks, REFINE_ITERS
                               (10) steps preconditioned by the kept factor

The later rounds are then not the exact minimizer of (N3) but a few exact
line searches towards it (each lowers L), at the cost of a step (out in² + P²)
instead of forming and factoring A (O(out in² M²) + P³/3): on SmolLM2 layers
this loses < 1% of final loss against re-factoring every round, at about half
the time (BENCHMARKS.md, AQLM).

Scales given codes and codebooks (AQLM step 1, second half): one scalar least
squares per row,

    s_i = (z_i H w_iᵀ) / (z_i H z_iᵀ)                                                 (S)
"""

import numpy as np
import scipy.linalg
from numba import njit, prange

DIRECT_MAX = 4096          # largest number of codebook unknowns solved by Cholesky
PCG_MAX_ITERS = 100        # conjugate-gradient steps per codebook update (at most)
REFINE_ITERS = 10          # ... after the first round, when P <= DIRECT_MAX (see update_codebooks)
PCG_RTOL = 1e-8            # ... stopped when the preconditioned residual norm falls by this
PROX = 1e-10               # λ of the proximal codebook solve, relative to mean diag(A)


def codebook_solver(M, nc, g):
    """The solver for P = M nc g unknowns: "direct" (Cholesky) up to DIRECT_MAX, else "pcg"."""
    return "direct" if M * nc * g <= DIRECT_MAX else "pcg"


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
    """A (P, P) of (N1), P = M*nc*g, index (m, c, a) -> (m*nc + c)*g + a."""
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
    solver = solver or codebook_solver(M, nc, g)
    ptr, occ_i, occ_k = _occurrences(codes, nc)
    s2 = scales * scales
    theta0 = C.reshape(-1)                                       # (P,)
    y = _scatter(scales[:, None] * (W @ H), ptr, occ_i, occ_k, g).reshape(-1)   # (N2) y = Σ s_i S_iᵀ H w_i
    if solver == "direct":
        factor = factor or normal_cholesky(H, codes, scales, nc, g)
        if factor is None:                                       # A + λI never factored
            return C.copy(), solver
        cf, lam = factor                                         # (N3) (A + λI) θ = y + λ θ_old
        theta = scipy.linalg.cho_solve(cf, y + lam * theta0, check_finite=False)
        return theta.reshape(M, nc, g), solver

    # preconditioned conjugate gradients on the same system, A applied as
    # A p = Σ_i s_i² S_iᵀ H S_i p  (dequantize p, multiply by H, scatter back)
    def apply_A(p):
        Zp = unscaled_rows(codes, p.reshape(M, nc, g))           # (out, in)
        return _scatter(s2[:, None] * (Zp @ H), ptr, occ_i, occ_k, g).reshape(-1)

    if factor is not None:                                       # an earlier round's Cholesky
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
    """s_i = (z_i H w_iᵀ) / (z_i H z_iᵀ), (S): exact per-row minimizer (step 1, scales)."""
    Z = unscaled_rows(codes, C)                                  # (out, in)
    ZH = Z @ H
    num = np.einsum("ij,ij->i", ZH, W)
    den = np.einsum("ij,ij->i", ZH, Z)
    ok = den > 0
    s = scales.copy()
    s[ok] = num[ok] / den[ok]
    return s


def update_codebooks(W, H, scales, codes, C, factor):
    """One round's codebook update; the only place the solver is chosen.

    factor: the Cholesky factor kept from the first round (None before it).
    -> (C_new (M, nc, g) float64, factor to keep).
    """
    M, nc, g = C.shape
    if codebook_solver(M, nc, g) == "pcg":                      # large P: block-Jacobi PCG
        return solve_codebooks(W, H, scales, codes, C, "pcg")[0], None
    if factor is None:                                           # first round: exact solve
        factor = normal_cholesky(H, codes, scales, nc, g)
        if factor is None:                                       # A + λI never factored
            return C.copy(), None
        return solve_codebooks(W, H, scales, codes, C, "direct", factor=factor)[0], factor
    # later rounds: REFINE_ITERS warm PCG steps, preconditioned by round 1's factor
    return solve_codebooks(W, H, scales, codes, C, "pcg", factor=factor,
                           max_iters=REFINE_ITERS)[0], factor
