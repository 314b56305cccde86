"""QuantEase: layer-wise quantization by cyclic coordinate descent (CD).

Behdin, Acharya, Gupta, Song, Zhu, Mazumder, "QuantEase: Optimization-based
Quantization for Language Models" (arXiv 2309.01885); reference code
linkedin/QuantEase method/quantease.py, method/quantease_outlier.py.

Objective (paper eq. 2), with H = mean x xᵀ and every (row, group) grid FIXED:

    min_Ŵ  f(Ŵ) = tr((W - Ŵ) H (W - Ŵ)ᵀ),    Ŵ[r, c] ∈ {s_rg (q - z_rg) : q = 0..2^b-1}

Coordinate update (paper Lemma 1), derived here.  Write E = W - Ŵ (out, in)
and look at f as a function of one column ŵ_j only, the others fixed:

    f = H_jj ‖e_j‖² + 2 e_jᵀ Σ_{k≠j} e_k H_kj + const
    ∂f/∂e_j = 0   =>   e_j = -Σ_{k≠j} e_k H_kj / H_jj

so the unconstrained minimiser of column j is

    ũ_j = w_j + Σ_{k≠j} (w_k - ŵ_k) H_kj / H_jj                            (CD-1)

(PLUS sign: some write-ups of the update carry a minus; the official code
computes the plus, as P - P_hat with P = W H/diag, and so does GPTQ's OBS
update: an error pushed into correlated columns is compensated, not doubled).
The remaining function of ŵ_j is H_jj ‖ŵ_j - ũ_j‖² + const, separable over
the rows, so the exact minimiser over the grid is rounding each entry to the
nearest grid point:  ŵ_j = q(ũ_j).  Each column update is an exact minimum
over its coordinate block, so no update can increase f.

Incremental residual.  Keep R = E H (out, in).  Then R_j = H_jj e_j +
Σ_{k≠j} e_k H_kj, so (CD-1) is simply

    ũ_j = ŵ_j + R_j / H_jj                                                 (CD-2)

and after ŵ_j changes by δ (e_j changes by -δ)

    R -= δ ⊗ H_j,:                                                         (CD-3)

O(out * in) per column, O(out * in²) per sweep (skipped when δ = 0, which is
most columns after the first sweeps).  R is recomputed exactly (one GEMM)
before every sweep so rounding cannot accumulate.

Grid: fixed from the initial quantizer (--init): "rtn" = min-max per
(row, group) of W (refq.methods.rtn.find_params), "gptq" = the grids and
codes of refq's GPTQ with the same bits / group_size / sym / mse / act_order
(so QuantEase from GPTQ never ends worse than GPTQ).  act_order: columns are
swept by decreasing diag(H) and groups are runs of group_size columns in that
order (as GPTQ; the permutation is stored, format "uniform").  The official
code alternates rounded and unrounded ("relaxed") sweeps; refq always rounds,
which keeps the monotone descent.

Outlier-aware variant (--outlier-frac p > 0; paper §4, Algorithm 2):
Ŵ on the grid plus a sparse S with at most k = round(p * out * in) nonzeros:

    min f(Ŵ, S) = tr((W - Ŵ - S) H (W - Ŵ - S)ᵀ),   ‖S‖_0 <= k

- Start: M = the k largest |W| (official convention); the grid (and, for
  init gptq, GPTQ itself) is fit on W with those entries set to 0, i.e.
  without them; S0 = M ∘ (W - Ŵ0).
- Ŵ step: the CD sweep above on the target W - S (in (CD-1) w becomes w - s).
- S step: iterative hard thresholding (IHT) with step 1/λ, λ = λ_max(H).
  With R = (W - Ŵ - S) H, for any D
      f(S + D) = f(S) - 2<R, D> + tr(D H Dᵀ) <= f(S) - 2<R, D> + λ ‖D‖²
  and the right side, minimised over k-sparse S' = S + D, is minimised by
      S' = top_k(S + R / λ)                                                (IHT)
  (hard thresholding keeps the k largest |.|).  S' = S is feasible, hence
  f(S') <= bound(S') <= bound(S) = f(S): the step never increases f.
  (The official quantease_outlier.py writes P_hat instead of W_hat in the
  column update and misses a /H_jj in the correction; refq follows the
  derivation above.)  S is stored in float16; the rounded S' is kept only if
  f does not rise (rounding is the one thing that could make it rise),
  otherwise S stays.
- Each iteration = one Ŵ sweep + one S step; info["loss_trace"] has f after
  the initialisation and after every sweep / S step (never increasing).
- Stored as "uniform_sparse" (uniform fields + CSR outliers, all counted).

Dead inputs (H_jj = 0) do not affect f: their columns keep the initial value.
"""

import time

import numpy as np
import scipy.linalg
from numba import njit, prange

from refq.errors import RefqError
from refq.methods import rtn
from refq.methods.rtn import find_params, quantize_codes
from refq.options import ACT_ORDER, PERCDAMP, Option, defaults, no_effect
from refq.formats.uniform import UniformWeight
from refq.formats.uniform_sparse import UniformSparseWeight
from refq.methods.gptq import quantize_gptq
from refq.numeric import fp16, layer_loss

OPTIONS = rtn.OPTIONS + (
    ACT_ORDER.but(default=True),
    Option("iters", "int", 30, "coordinate-descent sweeps over all columns", range="[1, inf)"),
    Option("init", "choice", "gptq", "initial quantizer (it also fixes the grid)",
           choices=("rtn", "gptq")),
    Option("outlier_frac", "float", 0.0, "fraction of the weights kept as fp16 outliers "
           "(0: none)", range="[0, 1)"),
    PERCDAMP.but(help=PERCDAMP.help + " (--init gptq)"),
)
DEFAULTS = defaults(OPTIONS)


def validate(opts, given=()):
    """Checks across options (refq.api.validate_options calls it; `given`: the
    options set explicitly on the command line). -> error text or None."""
    return no_effect(given, ["percdamp"], opts["init"] == "gptq", "init is gptq (--init gptq)")


# ---------------------------------------------------------------------------
# numba kernel: one cyclic CD sweep over the columns (sweep order)
# ---------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def _rank1_update(Rt, H, delta, j):
    """R -= δ ⊗ H_j,:  (CD-3), in transposed layout; rows k of Rt are independent."""
    n, out = Rt.shape
    for k in prange(n):
        h = H[j, k]
        if h != 0.0:
            for r in range(out):
                Rt[k, r] -= delta[r] * h


@njit(cache=True)
def _sweep(What_t, codes_t, Rt, H, scales, zeros, gidx, maxq):
    """One cyclic pass j = 0..n-1 of exact coordinate minimisation.

    What_t  (n, out) float64  Ŵᵀ in sweep order; updated in place
    codes_t (n, out) uint8    codes of Ŵᵀ; updated in place
    Rt      (n, out) float64  ((W - S - Ŵ) H)ᵀ, kept up to date (CD-3)
    H       (n, n)   float64  Hessian in sweep order (undamped)
    scales  (G, out) float64  fixed grid of each group
    zeros   (G, out) float64
    gidx    (n,)     int64    group of each sweep-order column
    -> number of entries that changed
    """
    n, out = What_t.shape
    delta = np.zeros(out)
    changed = 0
    for j in range(n):
        hjj = H[j, j]
        if hjj <= 0.0:                                 # dead input: does not affect f
            continue
        g = gidx[j]
        nz = 0
        for r in range(out):
            u = What_t[j, r] + Rt[j, r] / hjj          # ũ_j = ŵ_j + R_j / H_jj      (CD-2)
            s = scales[g, r]
            z = zeros[g, r]
            q = np.rint(u / s) + z                     # ŵ_j = q(ũ_j): nearest grid point
            if q < 0.0:
                q = 0.0
            elif q > maxq:
                q = float(maxq)
            wq = s * (q - z)
            d = wq - What_t[j, r]
            delta[r] = d
            if d != 0.0:
                nz += 1
                What_t[j, r] = wq
                codes_t[j, r] = np.uint8(q)
        if nz:
            changed += nz
            _rank1_update(Rt, H, delta, j)             # R -= δ ⊗ H_j,:             (CD-3)
    return changed


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _loss_t(Et, Ht):
    """f = tr(E H Eᵀ) from Et (n, out) = Eᵀ -> (loss, Rt = H Et (n, out))."""
    Rt = Ht @ Et
    return float(np.sum(Et * Rt)), Rt


def topk_mask(A, k):
    """(out, in) bool: the k entries of largest |A| (ties: lowest flat index first)."""
    mask = np.zeros(A.size, dtype=bool)
    if k > 0:
        flat = np.abs(A).ravel()
        idx = np.argsort(-flat, kind="stable")[:k]
        mask[idx] = True
    return mask.reshape(A.shape)


def _init(W, H, opts, name):
    """Initial quantizer -> (order (n,), gidx (n,), scales (G, out), zeros (G, out),
    codes_t (n, out) uint8 in sweep order, store_perm bool, info dict).

    W (out, n) float64 is the weight the grid is fit on (outliers removed)."""
    bits, g_size, sym, mse = opts["bits"], opts["group_size"], opts["sym"], opts["mse"]
    out, n = W.shape
    g = g_size or n
    act = opts["act_order"]
    if opts["init"] == "gptq":
        gopts = dict(bits=bits, group_size=g_size, sym=sym, mse=mse, act_order=act,
                     static_groups=False, percdamp=opts["percdamp"], blocksize=128)
        qw = quantize_gptq(W, H, gopts, name)
        codes = qw.codes()                                   # (out, n) stored order
        if qw.perm is not None:                              # stored order = sweep order
            order = qw.perm.astype(np.int64)
        else:
            order = np.argsort(-np.diag(H), kind="stable") if act else np.arange(n)
            codes = codes[:, order]
        scales = qw.scales.astype(np.float64).T              # (G, out)
        zeros = qw.zeros().astype(np.float64).T              # (G, out)
        gidx = (np.arange(n) // g) if qw.perm is not None else (order // g)
        info = {"init_loss": qw.info["loss"], "percdamp_used": qw.info["percdamp_used"]}
        return order, gidx.astype(np.int64), scales, zeros, \
            np.ascontiguousarray(codes.T), qw.perm is not None, info
    # rtn: min-max grid per group; with act_order and groups, groups are runs of
    # g columns in sweep order (as GPTQ / the official code)
    order = np.argsort(-np.diag(H), kind="stable") if act else np.arange(n)
    store_perm = act and g_size is not None
    Wp = W[:, order] if store_perm else W                   # columns grouped as stored
    G = -(-n // g)
    scales, zeros = np.empty((G, out)), np.empty((G, out))
    codes = np.empty((out, n), dtype=np.uint8)
    for gi in range(G):
        c0, c1 = gi * g, min(gi * g + g, n)
        scales[gi], zeros[gi] = find_params(Wp[:, c0:c1], bits, sym, mse, name)
        codes[:, c0:c1] = quantize_codes(Wp[:, c0:c1], scales[gi], zeros[gi], 2 ** bits - 1)
    if not store_perm:
        codes = codes[:, order]
    gidx = (np.arange(n) // g) if store_perm else (order // g)
    return order, gidx.astype(np.int64), scales, zeros, np.ascontiguousarray(codes.T), store_perm, {}


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def quantize_quantease(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 -> UniformWeight | UniformSparseWeight."""
    tick = time.perf_counter()
    out, n = W.shape
    bits, g_size = opts["bits"], opts["group_size"]
    maxq = 2 ** bits - 1
    k = int(round(opts["outlier_frac"] * out * n))

    M = topk_mask(W, k)                                  # (out, n) initial outliers
    order, gidx, scales, zeros, codes_t, store_perm, info = _init(np.where(M, 0.0, W), H, opts, name)
    inv = np.argsort(order)

    Hs = np.ascontiguousarray(H[order][:, order])        # (n, n) sweep order
    Wt = np.ascontiguousarray(W[:, order].T)             # (n, out)
    What_t = scales[gidx] * (codes_t - zeros[gidx])      # (n, out) Ŵᵀ = s (q - z)
    St = np.zeros((n, out))                              # (n, out) Sᵀ, float16 values
    if k:
        St = fp16(np.where(M[:, order].T, Wt - What_t, 0.0))   # S0 = M ∘ (W - Ŵ0)
        lam = float(scipy.linalg.eigh(H, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])
        if not lam > 0:
            raise RefqError(f"{name or 'quantease'}: H has no positive eigenvalue")

    loss, Rt = _loss_t(Wt - St - What_t, Hs)
    trace = [loss]
    changed = []
    s_accepted = 0
    for it in range(opts["iters"]):
        # ---- Ŵ step: one CD sweep on the target W - S
        changed.append(int(_sweep(What_t, codes_t, Rt, Hs, scales, zeros, gidx, maxq)))
        loss, Rt = _loss_t(Wt - St - What_t, Hs)         # exact R again: no drift
        trace.append(loss)
        if k:
            # ---- S step: IHT with step 1/λ_max(H), float16 values, safeguarded
            cand = St + Rt / lam                         # S + R/λ      (IHT)
            S_new = fp16(np.where(topk_mask(cand, k), cand, 0.0))
            loss_new, R_new = _loss_t(Wt - S_new - What_t, Hs)
            if loss_new <= loss:
                St, loss, Rt = S_new, loss_new, R_new
                s_accepted += 1
            trace.append(loss)
        elif changed[-1] == 0:                           # fixed point: further sweeps change nothing
            break

    codes = codes_t.T                                    # (out, n) sweep order
    if not store_perm:
        codes = codes[:, inv]                            # original column order
    info.update(name=name, loss_trace=trace, sweeps=len(changed), changed=changed)
    kw = dict(perm=order if store_perm else None, method="quantease", options=opts, info=info)
    if k:
        S = St.T[:, inv]                                 # (out, n) original order
        qw = UniformSparseWeight.from_codes(np.ascontiguousarray(codes), scales.T, zeros.T, bits,
                                            g_size, opts["sym"], S=S, **kw)
        qw.info["outliers"] = qw.outliers.nnz
        qw.info["s_steps_accepted"] = s_accepted
    else:
        qw = UniformWeight.from_codes(np.ascontiguousarray(codes), scales.T, zeros.T, bits,
                                      g_size, opts["sym"], **kw)
    qw.info["seconds"] = time.perf_counter() - tick
    qw.info["loss"] = layer_loss(W, qw.dequantize(), H)
    return qw
