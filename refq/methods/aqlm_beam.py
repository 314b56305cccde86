"""AQLM's code update: beam search over the codes of each row, exact objective.

Notation of refq.methods.aqlm: W (out, in), H = mean x xᵀ, row i of W_hat is
s_i Σ_m C_m[b_i·m], codes b (out, K, M), codebooks C (M, nc, g).

Codes given codebooks and scales (AQLM step 2): beam search (paper §3, "beam
search" phase; official code beam_search_xtx.py) over the groups k (in a
seeded random order, as the official code) and the codebooks m (ditto), per
row, with the exact objective including the coupling between groups through
H.  Changing code b_ikm from `old` to c changes group k of the row by
s_i (C_m[c] - C_m[old]).  With r the row's residual,

    L(c) - L(old) = s_i² (Q[k,m,c] - Q[k,m,old]) - 2 s_i (C_m[c] - C_m[old])ᵀ v    (B)
    v        = (H r)_k + s_i H_kk C_m[old]     (H times the residual without `old`)
    Q[k,m,c] = C_m[c]ᵀ H_kk C_m[c]            (codebook_quadratics, per round, all k, m, c)

so a candidate costs g multiply-adds.  H r is computed once per round for all
rows (one BLAS product R H) and updated by H[:, group k] Δŵ (g*in
multiply-adds) only when a code changes, which after the first rounds is
rare.  Beam size 1 is coordinate descent (the old code competes with Δ = 0,
so L cannot rise); a wider beam keeps the best `beam_size` partial
assignments, always including the old codes' branch in the candidate set, so
its best member cannot be worse either.  Rows are independent: parallel over
rows (beam_search), each row's search sequential (_search_row).
"""

import numpy as np
from numba import njit, prange


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
                for c0 in range(0, nc, BLK):       # candidates in blocks of BLK codes (B)
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
