"""CLAQ: column-level k-means quantization, adaptive precision, outlier reservation.

Wang et al., "CLAQ: Pushing the Limits of Low-Bit Post-Training Quantization
for LLMs" (arXiv 2405.17233); reference code fayuge/CLAQ (claq.py, quant.py).

Objective (as GPTQ, refq.methods.gptq), per linear layer with H = mean x xᵀ:

    min_Q  tr((W - Q) H (W - Q)ᵀ),   column j of Q taking values in a codebook
                                     C_j of 2^{b_j} centroids (non-uniform)

The GPTQ column loop (paper §3.1, Algorithm 1; refq.methods.gptq_skeleton,
this file holds only the per-column step), with the grid of column j replaced
by the exact 1-D k-means of the CURRENT column (after the earlier columns'
errors were pushed into it):

    C_j      = argmin_C Σ_r (w_rj - nearest_C(w_rj))²        (paper eq. 3; refq.methods.kmeans1d)
    q_j      = nearest_{C_j}(w_j)
    err_j    = (w_j - q_j) / U_jj                              (GPTQ eq. 5, U = chol(H^-1) upper)
    W[:, k] -= err_j · U_jk    for the columns k after j

Adaptive precision, AP (paper §3.2): outlier score of column j

    s_j = #{ r : |W_rj| >= t · mean|W| }       (t = outlier_threshold = 13)

columns ranked by s (descending, ties by index); for an average of b bits:
b in [2, 3): the top (b - 2)/2 of the columns get 4 bits, the rest 2;
b in [3, 4]: the top (b - 3) get 4 bits, the rest 3 (paper eq. 6-7).  The
number of 4-bit columns is round(fraction · in), so the average is within
1/in of b.  An explicit per-column list (`column_bits`, API only) replaces it.

Outlier reservation, OR (paper §3.3, "dynamic"): the top or_top_frac (10%) of
columns by s keep a fraction or_ratio_high (1.4%) of their entries at each
tail in fp16, the others or_ratio_low (0.4%): round(r · out) largest and as
many smallest values of the column.  They are stored as the additive CSR S of
refq.formats.outliers (S = fp16(w - codebook value)), and paid for in
bits_per_weight (32 bits each + 32 bits per row), not just the paper's ~0.07.
or_fit: "after" fits the centroids on the column without its reserved
values, "before" on the whole column (as the official code does); see
BENCHMARKS.md for the measurement that chose the default.

Differences from the official code (on purpose):
- exact k-means (DP) instead of sklearn KMeans(random_state=10): never worse,
  deterministic, much faster;
- the OR fraction of a column is looked up by its absolute column index (the
  official `out_per[i]` indexes inside the 128-column block: a bug);
- the outlier score is computed once on the original W and follows the
  columns through act_order;
- centroids are rounded to fp16 (what is stored) before the codes are
  chosen, so the GPTQ error feedback sees the values the model will use.
"""

import time

import numpy as np
from numba import njit

from refq.errors import RefqError
from refq.formats.codebook import CodebookWeight
from refq.formats.outliers import CSR
from refq.methods.gptq_skeleton import obs_update, prepare, sweep
from refq.methods.kmeans1d import kmeans1d_centroids
from refq.options import ACT_ORDER, BLOCKSIZE, PERCDAMP, Option, defaults, no_effect
from refq.numeric import layer_loss, round_fp16

OPTIONS = (
    Option("bits", "number", 3, "bits per column: an integer, or an average in 2..4 reached "
           "by adaptive precision", range="[2, 8]"),
    Option("ap", "bool", True, "adaptive precision: 4 bits for the columns with the most "
           "outliers (used when --bits is fractional)"),
    Option("outlier_threshold", "float", 13.0, "t in the outlier score: |w| >= t * mean|W| "
           "counts as an outlier", range="(0, inf)"),
    Option("outlier_reservation", "bool", False, "keep each column's extreme values in fp16 "
           "(OR)"),
    Option("or_ratio_high", "float", 0.014, "OR: fraction kept at each tail in the top "
           "--or-top-frac columns", range="[0, 0.5)"),
    Option("or_ratio_low", "float", 0.004, "OR: fraction kept at each tail in the other columns",
           range="[0, 0.5)"),
    Option("or_top_frac", "float", 0.1, "OR: fraction of columns (by outlier score) that get "
           "--or-ratio-high", range="[0, 1]"),
    Option("or_fit", "choice", "after", "OR: fit the centroids after removing the reserved "
           "values (measured better) or before", choices=("after", "before")),
    ACT_ORDER.but(default=True),                  # measured: lower loss on every SmolLM2 layer tried
    PERCDAMP,
    BLOCKSIZE,
    Option("column_bits", "int_list", None, "explicit bit width of every input column "
           "(overrides bits and ap)", range="[1, 8]", none="from --bits and --ap",
           api_only=True),
)
DEFAULTS = defaults(OPTIONS)
OR_OPTIONS = ["or_ratio_high", "or_ratio_low", "or_top_frac", "or_fit"]


def validate(opts, given=()):
    """Checks across options (refq.api.validate_options calls it; `given`: the
    options set explicitly on the command line). -> error text or None."""
    b = opts["bits"]
    if opts["column_bits"] is None and not float(b).is_integer():
        if not opts["ap"]:
            return f"bits {b}: a fractional average needs adaptive precision (--ap)"
        if not 2 <= b <= 4:
            return f"bits {b}: adaptive precision reaches averages in 2..4 only"
    return (no_effect(given, OR_OPTIONS, opts["outlier_reservation"],
                      "outlier_reservation is on (--outlier-reservation)")
            or no_effect(given, ["ap"], not float(b).is_integer(),
                         "bits is fractional (e.g. --bits 2.5)"))


# ---------------------------------------------------------------------------
# outlier score, adaptive precision, reservation ratios
# ---------------------------------------------------------------------------
def outlier_scores(W, t):
    """(in,) int64: s_j = #{r : |W_rj| >= t · mean|W|} (mean over the whole matrix)."""
    A = np.abs(W)
    return np.count_nonzero(A >= t * A.mean(), axis=0).astype(np.int64)


def rank_columns(scores):
    """Columns by decreasing score, ties by increasing index."""
    return np.argsort(-scores, kind="stable")


def allocate_bits(scores, bits):
    """AP rule (paper eq. 6-7) -> (in,) int64 bits per column with mean within 1/in of `bits`."""
    n = scores.size
    if bits < 3:
        lo, frac = 2, (bits - 2) / 2          # 2-bit columns, top (b-2)/2 at 4 bits
    else:
        lo, frac = 3, bits - 3                # 3-bit columns, top (b-3) at 4 bits
    n_hi = int(np.floor(frac * n + 0.5))
    out = np.full(n, lo, dtype=np.int64)
    out[rank_columns(scores)[:n_hi]] = 4
    return out


def reservation_counts(scores, n_rows, r_high, r_low, top_frac):
    """(in,) int64 values reserved at EACH tail of each column."""
    n = scores.size
    ratio = np.full(n, r_low)
    ratio[rank_columns(scores)[:int(np.floor(top_frac * n + 0.5))]] = r_high
    return np.floor(ratio * n_rows + 0.5).astype(np.int64)


# ---------------------------------------------------------------------------
# numba kernels: one column, the columns of a block
# ---------------------------------------------------------------------------
@njit(cache=True)
def quantize_column(w, b, n_res, fit_after, cents, codes, S):
    """One column (paper eq. 3 + outlier reservation).

    w      (out,) float64  the current (error-updated) column
    b      bits: 2^b centroids;  n_res: values reserved at EACH tail (0 = no OR)
    out:   cents (>= 2^b,) the fp16-rounded ascending centroids in cents[:2^b];
           codes (out,) the nearest centroid of every value;
           S (out,) the additive fp16 corrections (0 outside the reserved entries)
    -> q (out,) float64: the values the layer will use (centroid + correction)
    """
    out = w.shape[0]
    k = 1 << b
    reserved = np.zeros(out, dtype=np.bool_)
    if n_res > 0:
        order = np.argsort(w, kind="mergesort")          # stable: ties by row index
        for t in range(n_res):
            reserved[order[t]] = True                    # smallest values
            reserved[order[out - 1 - t]] = True          # largest values
    fit = w
    if n_res > 0 and fit_after and 2 * n_res < out:
        fit = w[~reserved]                               # centroids of the kept values only
    c = kmeans1d_centroids(fit, k)                       # exact 1-D k-means (eq. 3)
    for m in range(k):
        c[m] = round_fp16(c[m])                          # what is stored
    c.sort()
    cents[:k] = c
    q = np.empty(out)
    for r in range(out):                                 # nearest centroid (ties: lower)
        lo, hi = 0, k - 1                                # binary search on the midpoints
        while lo < hi:
            mid = (lo + hi) // 2
            if w[r] <= 0.5 * (c[mid] + c[mid + 1]):
                hi = mid
            else:
                lo = mid + 1
        codes[r] = lo
        q[r] = c[lo]
        S[r] = 0.0
        if reserved[r]:
            S[r] = round_fp16(w[r] - c[lo])              # kept "in fp16": exact correction
            q[r] += S[r]
    return q


@njit(cache=True)
def _quantize_columns(Wt, U, Err, cents_t, codes_t, S_t, bits_p, nres_p, fit_after,
                      j0, j1, block_start, block_end):
    """CLAQ's step on processing-order columns j0..j1-1 of the block [block_start, block_end).

    Wt (n, out) columns of W as rows, updated in place; U (n, n) upper Cholesky factor of
    H^-1; Err (B, out) out: scaled errors of the block; cents_t (n, 256), codes_t (n, out),
    S_t (n, out) out: codebook, codes and corrections of each column; bits_p, nres_p (n,)
    bits and reserved count per tail of each processing-order column.
    """
    for j in range(j0, j1):
        q = quantize_column(Wt[j], bits_p[j], nres_p[j], fit_after, cents_t[j], codes_t[j], S_t[j])
        obs_update(Wt, U, Err, q, j, block_start, block_end)   # err_j = (w_j - q_j) / U_jj (GPTQ eq. 5)


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def quantize_claq(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 -> CodebookWeight."""
    tick = time.perf_counter()
    out, n = W.shape
    label = name or "claq"
    prep = prepare(W, H, opts["percdamp"], opts["act_order"], name)   # dead inputs, perm, U, Wt
    perm = prep.perm

    scores = outlier_scores(prep.W, opts["outlier_threshold"])  # (in,) original column order
    if opts["column_bits"] is not None:
        col_bits = np.asarray(opts["column_bits"], dtype=np.int64)
        if col_bits.shape != (n,):
            raise RefqError(f"{label}: option column_bits has {col_bits.size} entries, "
                            f"the layer has {n} input columns")
    elif float(opts["bits"]).is_integer():          # uniform width (AP changes nothing)
        col_bits = np.full(n, int(opts["bits"]), dtype=np.int64)
    else:                                            # adaptive precision (validate: ap is on)
        col_bits = allocate_bits(scores, opts["bits"])
    if opts["outlier_reservation"]:
        n_res = reservation_counts(scores, out, opts["or_ratio_high"], opts["or_ratio_low"],
                                   opts["or_top_frac"])
    else:
        n_res = np.zeros(n, dtype=np.int64)

    bits_p = col_bits[perm].astype(np.int64)         # (in,) per processing-order column
    nres_p = n_res[perm].astype(np.int64)
    cents_t = np.zeros((n, 256))                     # (in, 256) codebooks, first 2^b used
    codes_t = np.zeros((n, out), dtype=np.uint8)     # (in, out)
    S_t = np.zeros((n, out))                         # (in, out) reserved corrections
    fit_after = opts["or_fit"] == "after"

    def quantize_columns(j0, j1, b0, b1, Err):       # every column has its own codebook
        _quantize_columns(prep.Wt, prep.U, Err, cents_t, codes_t, S_t, bits_p, nres_p, fit_after,
                          j0, j1, b0, b1)

    sweep(prep.Wt, prep.U, opts["blocksize"], quantize_columns)
    inv = np.argsort(perm)                           # back to the original column order
    codes = codes_t[inv].T                           # (out, in)
    S = S_t[inv].T                                   # (out, in)
    cents = [cents_t[inv[c], :2 ** int(col_bits[c])] for c in range(n)]

    info = dict(prep.info(name),
                columns_per_bits={str(int(b)): int(np.count_nonzero(col_bits == b))
                                  for b in np.unique(col_bits)},
                mean_column_bits=float(col_bits.mean()),
                outliers=int(2 * n_res.sum()))
    qw = CodebookWeight.from_codes(codes, cents, col_bits, CSR.from_dense(S), method="claq",
                                   options=opts, info=info)
    qw.info["seconds"] = time.perf_counter() - tick
    qw.info["loss"] = layer_loss(W, qw.dequantize(), H)
    return qw
