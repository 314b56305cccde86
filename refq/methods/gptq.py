"""GPTQ: one-shot quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023
(arXiv 2210.17323); reference code IST-DASLab/gptq gptq.py `fasterquant`.

Objective (paper eq. 1), per linear layer, with H = mean x xᵀ:

    min_Q  tr((W - Q) H (W - Q)ᵀ)      Q on a per-(row, group) uniform grid

Columns are quantized one at a time, in order (or by decreasing diag(H) with
act_order); after column j is rounded, the not-yet-quantized columns absorb its
error through the inverse Hessian (OBS update, paper eq. 2-3):

    err_j  = (w_j - q_j) / [H_F^-1]_jj
    W_F   -= err_j ⊗ [H_F^-1]_{j,F}

GPTQ's "Cholesky reformulation" (paper §3 step 3, eq. 5): the rows of the
upper Cholesky factor U of H^-1 (H^-1 = Uᵀ U) are exactly the rows the
sequence of OBS updates needs, so

    err_j  = (w_j - q_j) / U_jj ;   W[:, k] -= err_j * U_jk   for k > j.

"Lazy batch updates" (paper §3 step 2, eq. 4): inside a block of B columns
the updates touch only the block; the rest of W is updated once per block:

    W[:, block_end:] -= Err_block @ U[block, block_end:]

Groups (group_size g): the grid (scale, zero) of a group is fit when its first
column is reached, on the weights as updated by all earlier columns (refq
always fits on the fully updated weights, also when the group extends past
the current block: those columns are brought up to date first, so the result
does not depend on blocksize).  static_groups: all grids are fit up front on
the original W, group = original column // g (also with act_order).

Implementation notes
- Everything runs in float64; W is transposed to (in, out) so that a column
  is contiguous.  The inner per-column loop is a numba kernel (sequential,
  hence deterministic).
- Dead inputs (H_jj == 0): H_jj = 1 and W[:, j] = 0 (as the reference).
- Damping: H += percdamp * mean(diag H) * I.  If a Cholesky factorisation
  fails, percdamp is multiplied by 10 (up to MAX_RETRIES times) and a
  DampingWarning names the layer and the damping used; info records it.
- The grid of each column is the min-max quantizer of refq.methods.rtn, so
  with H = identity GPTQ returns exactly RTN's codes.
"""

import time
import warnings

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
from numba import njit

from refq.errors import RefqError
from refq.methods import rtn
from refq.methods.rtn import find_params, group_bounds
from refq.options import ACT_ORDER, BLOCKSIZE, PERCDAMP, Option, defaults

OPTIONS = rtn.OPTIONS + (
    ACT_ORDER,
    Option("static_groups", "bool", False, "fit every group's grid up front on the original W "
           "(needs --group-size)"),
    PERCDAMP,
    BLOCKSIZE,
)
DEFAULTS = defaults(OPTIONS)

MAX_RETRIES = 4  # percdamp, x10, x100, x1000, x10000


def validate(opts, given=()):
    """Checks across options (refq.api.validate_options calls it; `given`: the
    options set explicitly on the command line). -> error text or None."""
    if opts["static_groups"] and opts["group_size"] is None:
        return "static_groups needs group_size (--group-size)"


class DampingWarning(UserWarning):
    """The Hessian needed more damping than asked for to be factorised."""


# ---------------------------------------------------------------------------
# numba kernel: the column loop inside one block, for a run of columns that
# share their groups' grids (paper Algorithm 1, inner loop)
# ---------------------------------------------------------------------------
@njit(cache=True)
def _quantize_columns(Wt, U, Err, codes_t, scales, zeros, gidx, maxq, j0, j1, block_start, block_end):
    """Quantize processing-order columns j0..j1-1 (inside the block [block_start, block_end)).

    Wt      (n, out) float64  weights, row j = column j of W; updated in place
    U       (n, n)   float64  upper Cholesky factor of the damped H^-1
    Err     (B, out) float64  out: scaled errors (w_j - q_j) / U_jj of the block,
                              row j - block_start
    codes_t (n, out) uint8    out: codes of column j
    scales  (G, out) float64  grid of each group (float16-representable)
    zeros   (G, out) float64
    gidx    (n,)     int64    group of each processing-order column
    """
    out = Wt.shape[1]
    for j in range(j0, j1):
        d = U[j, j]
        g = gidx[j]
        e = j - block_start
        for r in range(out):
            w = Wt[j, r]
            s = scales[g, r]
            z = zeros[g, r]
            q = np.rint(w / s) + z                 # q = clamp(round(w/s) + z, 0, maxq)
            if q < 0.0:
                q = 0.0
            elif q > maxq:
                q = float(maxq)
            codes_t[j, r] = np.uint8(q)
            Err[e, r] = (w - s * (q - z)) / d      # err = (w - q_hat) / U_jj   (eq. 5)
        for k in range(j + 1, block_end):          # W[:, k] -= err * U_jk, k in block
            u = U[j, k]
            if u != 0.0:
                for r in range(out):
                    Wt[k, r] -= Err[e, r] * u


# ---------------------------------------------------------------------------
# inverse-Hessian Cholesky factor with damping retries
# ---------------------------------------------------------------------------
def inverse_cholesky(H, percdamp, name=""):
    """H (n, n) float64 (dead channels already fixed) -> (U, percdamp_used, retries).

    U is upper triangular with H_damped^-1 = Uᵀ U.

    Computed without forming H^-1 (one Cholesky + one triangular inverse instead
    of the reference's Cholesky, inverse, Cholesky): with J the exchange matrix
    (index reversal) and J Hd J = L Lᵀ (lower L),
        Hd^-1 = J L^-ᵀ L^-1 J = Uᵀ U   with   U = J L^-1 J,
    which is upper triangular with a positive diagonal, hence THE upper
    Cholesky factor of Hd^-1 (unique).
    """
    n = H.shape[0]
    diag = np.arange(n)
    mean_diag = float(np.mean(np.diag(H)))
    Hr = np.ascontiguousarray(H[::-1, ::-1])                 # J H J
    p = percdamp
    for attempt in range(MAX_RETRIES + 1):
        A = Hr.copy()
        A[diag, diag] += p * mean_diag                       # J Hd J
        L, info = scipy.linalg.lapack.dpotrf(A, lower=1, clean=1, overwrite_a=1)
        if info == 0:
            L, info = scipy.linalg.lapack.dtrtri(L, lower=1, overwrite_c=1)   # L^-1
        if info != 0 or not np.all(np.isfinite(L)):
            p *= 10
            continue
        U = np.ascontiguousarray(L[::-1, ::-1])             # J L^-1 J, upper
        if attempt:
            warnings.warn(f"{name or 'gptq'}: Cholesky of the damped Hessian failed with "
                          f"percdamp={percdamp:g}; used percdamp={p:g} "
                          f"(damping {p * mean_diag:.4g})", DampingWarning, stacklevel=3)
        return U, p, attempt
    raise RefqError(f"{name or 'gptq'}: Hessian is not positive definite even with "
                    f"percdamp={p / 10:g}; check the calibration data")


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def quantize_gptq(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 (mean x xᵀ) -> UniformWeight."""
    from refq.api import layer_loss
    from refq.formats.uniform import UniformWeight

    bits, g_size, sym, mse = opts["bits"], opts["group_size"], opts["sym"], opts["mse"]
    act_order, static, bs = opts["act_order"], opts["static_groups"], opts["blocksize"]
    tick = time.perf_counter()
    maxq = 2 ** bits - 1
    out, n = W.shape
    W_in, H_in = W, H
    W = W.copy()                                 # (out, n)
    H = H.copy()                                 # (n, n)

    dead = np.diag(H) == 0                       # inputs that never fire
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = g_size or n
    bounds = group_bounds(n, g_size)             # groups in STORED column order
    G = len(bounds)
    scales = np.empty((G, out))                  # (G, out)
    zeros = np.empty((G, out))                   # (G, out)
    if static:                                   # all grids up front, original order
        for gi, (c0, c1) in enumerate(bounds):
            scales[gi], zeros[gi] = find_params(W[:, c0:c1], bits, sym, mse, name)

    if act_order:                                # largest diag(H) first; stable ties
        perm = np.argsort(-np.diag(H), kind="stable")
        H = H[perm][:, perm]
    else:
        perm = np.arange(n)
    # group of each processing-order column: static -> original column // g;
    # otherwise groups are runs of g columns in processing order
    gidx = (perm // g) if static else (np.arange(n) // g)
    gidx = gidx.astype(np.int64)

    U, p_used, retries = inverse_cholesky(H, opts["percdamp"], name)

    Wt = np.ascontiguousarray(W[:, perm].T)      # (n, out) processing-order column j = row j
    del W
    Err = np.zeros((min(bs, n), out))            # (B, out) errors of the current block
    codes_t = np.zeros((n, out), dtype=np.uint8) # (n, out)

    for b0 in range(0, n, bs):                   # blocks (lazy batch updates, eq. 4)
        b1 = min(b0 + bs, n)
        j = b0
        while j < b1:
            if not static and j % g == 0:        # a group starts: fit its grid now
                ge = min(j + g, n)
                cols = Wt[j:ge].copy()           # (<=g, out) up to date within the block
                if ge > b1:                      # columns past the block: apply pending updates
                    cols[b1 - j:] -= U[b0:j, b1:ge].T @ Err[:j - b0]
                scales[j // g], zeros[j // g] = find_params(cols.T, bits, sym, mse, name)
            stop = b1 if static else min(b1, (j // g + 1) * g)
            _quantize_columns(Wt, U, Err, codes_t, scales, zeros, gidx, maxq, j, stop, b0, b1)
            j = stop
        if b1 < n:
            Wt[b1:] -= U[b0:b1, b1:].T @ Err[:b1 - b0]

    codes = codes_t.T                            # (out, n) processing order
    stored_perm = None
    if act_order:
        if g_size is not None and not static:    # groups follow the processing order
            stored_perm = perm
        else:                                    # grids do not depend on the order
            codes = codes[:, np.argsort(perm)]
    info = {"name": name, "percdamp_used": float(p_used), "damping_retries": int(retries),
            "dead_inputs": int(dead.sum())}
    qw = UniformWeight.from_codes(np.ascontiguousarray(codes), scales.T, zeros.T, bits, g_size,
                                  sym, perm=stored_perm, method="gptq", options=opts, info=info)
    qw.info["seconds"] = time.perf_counter() - tick
    qw.info["loss"] = layer_loss(W_in, qw.dequantize(), H_in)
    return qw
