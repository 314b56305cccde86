"""CLAQ: column-level k-means quantization, adaptive precision, outlier reservation.

Wang et al., "CLAQ: Pushing the Limits of Low-Bit Post-Training Quantization
for LLMs" (arXiv 2405.17233); reference code fayuge/CLAQ (claq.py, quant.py).

Objective (as GPTQ, refq.methods.gptq), per linear layer with H = mean x xᵀ:

    min_Q  tr((W - Q) H (W - Q)ᵀ),   column j of Q taking values in a codebook
                                     C_j of 2^{b_j} centroids (non-uniform)

The GPTQ column loop (paper §3.1, Algorithm 1), with the grid of column j
replaced by the exact 1-D k-means of the CURRENT column (after the earlier
columns' errors were pushed into it):

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

from refq.errors import RefqError
from refq.methods.gptq import inverse_cholesky
from refq.methods.kmeans1d import kmeans1d, nearest_centroid

DEFAULTS = {
    "bits": 3,                     # bits per column: an integer 2..8, or an average in (2, 4) with AP
    "ap": True,                    # adaptive precision (used when bits is fractional)
    "outlier_threshold": 13.0,     # t in the outlier score
    "outlier_reservation": False,  # OR on/off
    "or_ratio_high": 0.014,        # per-tail fraction kept in fp16, top columns
    "or_ratio_low": 0.004,         # per-tail fraction kept in fp16, other columns
    "or_top_frac": 0.1,            # fraction of columns that get or_ratio_high
    "or_fit": "after",             # fit centroids "after" (measured better) or "before" the reservation
    "act_order": True,             # measured: lower loss on every SmolLM2 layer tried
    "percdamp": 0.01,
    "blocksize": 128,
    "column_bits": None,           # API only: explicit (in,) bit widths, overrides bits/ap
}
API_ONLY = {"column_bits"}


def _is_num(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _check_bits(v):
    if not _is_num(v) or not np.isfinite(v) or not 2 <= v <= 8:
        return f"must be a number in 2..8 (an average with --ap: 2..4), got {v!r}"


def _check_ratio(v):
    if not _is_num(v) or not 0 <= v < 0.5:
        return f"must be a number in [0, 0.5), got {v!r}"


def _check_frac(v):
    if not _is_num(v) or not 0 <= v <= 1:
        return f"must be a number in [0, 1], got {v!r}"


def _check_threshold(v):
    if not _is_num(v) or not np.isfinite(v) or v <= 0:
        return f"must be a number > 0, got {v!r}"


def _check_or_fit(v):
    if v not in ("after", "before"):
        return f"must be 'after' or 'before', got {v!r}"


def _check_column_bits(v):
    if v is None:
        return None
    a = np.asarray(v)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer) \
            or a.min() < 1 or a.max() > 8:
        return "must be a 1-D list of integers in 1..8 (one per input column)"


CHECKS = {"bits": _check_bits, "outlier_threshold": _check_threshold,
          "or_ratio_high": _check_ratio, "or_ratio_low": _check_ratio,
          "or_top_frac": _check_frac, "or_fit": _check_or_fit,
          "column_bits": _check_column_bits}
CASTS = {"bits": lambda v: int(v) if float(v).is_integer() else float(v),
         "outlier_threshold": float, "or_ratio_high": float, "or_ratio_low": float,
         "or_top_frac": float, "ap": bool, "outlier_reservation": bool,
         "column_bits": lambda v: None if v is None else [int(b) for b in v]}


def validate(opts):
    """Checks across options (refq.api.validate_options calls it)."""
    b = opts["bits"]
    if opts["column_bits"] is None and not float(b).is_integer():
        if not opts["ap"]:
            return f"bits {b}: a fractional average needs adaptive precision (--ap)"
        if not 2 <= b <= 4:
            return f"bits {b}: adaptive precision reaches averages in 2..4 only"


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
# one column: k-means codebook (+ reserved outliers)
# ---------------------------------------------------------------------------
def quantize_column(w, b, n_res, or_fit):
    """w (out,) float64 current column -> (codes (out,), centroids (2^b,) fp16-exact float64,
    q (out,) the values used (codebook + reserved corrections), S (out,) float64 the
    additive fp16 corrections (0 outside the reserved entries))."""
    out = w.size
    S = np.zeros(out)
    reserved = None
    if n_res > 0:
        order = np.argsort(w, kind="stable")
        reserved = np.concatenate([order[:n_res], order[out - n_res:]])   # both tails
    fit = w
    if reserved is not None and or_fit == "after":
        keep = np.ones(out, dtype=bool)
        keep[reserved] = False
        if keep.any():
            fit = w[keep]
    cents, _ = kmeans1d(fit, 2 ** b)                               # exact 1-D k-means (eq. 3)
    cents = np.sort(cents.astype(np.float16).astype(np.float64))   # the stored fp16 values
    codes = nearest_centroid(w, cents)
    q = cents[codes]
    if reserved is not None:
        S[reserved] = (w[reserved] - q[reserved]).astype(np.float16)   # exact fp16 correction
        q = q + S
    return codes, cents, q, S


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def quantize_claq(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 -> CodebookWeight."""
    from refq.api import layer_loss
    from refq.formats.codebook import CodebookWeight
    from refq.formats.outliers import CSR

    tick = time.perf_counter()
    out, n = W.shape
    label = name or "claq"
    W_in, H_in = W, H
    W, H = W.copy(), H.copy()
    dead = np.diag(H) == 0                           # inputs that never fire (as GPTQ)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scores = outlier_scores(W, opts["outlier_threshold"])       # (in,)
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

    if opts["act_order"]:                            # largest diag(H) first; stable ties
        perm = np.argsort(-np.diag(H), kind="stable")
        H = H[perm][:, perm]
    else:
        perm = np.arange(n)
    U, p_used, retries = inverse_cholesky(H, opts["percdamp"], name)

    Wt = np.ascontiguousarray(W[:, perm].T)          # (in, out) processing-order column j = row j
    codes = np.zeros((out, n), dtype=np.int64)       # original column order
    cents = [None] * n                               # original column order
    S = np.zeros((out, n))                           # (out, in) reserved corrections
    bs = opts["blocksize"]
    Err = np.zeros((min(bs, n), out))                # (B, out)
    for b0 in range(0, n, bs):                       # lazy batch updates (GPTQ eq. 4)
        b1 = min(b0 + bs, n)
        for j in range(b0, b1):
            c = perm[j]                              # the original column
            cj, cent, q, s = quantize_column(Wt[j], int(col_bits[c]), int(n_res[c]), opts["or_fit"])
            codes[:, c], cents[c], S[:, c] = cj, cent, s
            err = (Wt[j] - q) / U[j, j]              # err_j = (w_j - q_j) / U_jj
            Err[j - b0] = err
            if j + 1 < b1:                           # W[:, k] -= err_j U_jk inside the block
                Wt[j + 1:b1] -= np.outer(U[j, j + 1:b1], err)
        if b1 < n:
            Wt[b1:] -= U[b0:b1, b1:].T @ Err[:b1 - b0]

    info = {"name": name, "percdamp_used": float(p_used), "damping_retries": int(retries),
            "dead_inputs": int(dead.sum()),
            "columns_per_bits": {str(int(b)): int(np.count_nonzero(col_bits == b))
                                 for b in np.unique(col_bits)},
            "mean_column_bits": float(col_bits.mean()),
            "outliers": int(2 * n_res.sum())}
    qw = CodebookWeight.from_codes(codes, cents, col_bits, CSR.from_dense(S), method="claq",
                                   options=opts, info=info)
    qw.info["seconds"] = time.perf_counter() - tick
    qw.info["loss"] = layer_loss(W_in, qw.dequantize(), H_in)
    return qw
