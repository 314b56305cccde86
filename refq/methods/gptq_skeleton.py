"""The GPTQ skeleton: what GPTQ, CLAQ, SpQR and SparseGPT share.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023
(arXiv 2210.17323), Algorithm 1.  CLAQ, SpQR and SparseGPT are this loop with
a different per-column step (how column j is rounded, clustered or pruned);
each method's file holds only that step.

Objective, per linear layer, with H = mean x xᵀ (GPTQ eq. 1):

    min_Q  tr((W - Q) H (W - Q)ᵀ)

Columns are processed one at a time; after column j is set to q_j, the
not-yet-processed columns F absorb its error through the inverse Hessian
(OBS update, GPTQ eq. 2-3):

    err_j  = (w_j - q_j) / [H_F^-1]_jj
    W_F   -= err_j ⊗ [H_F^-1]_{j,F}

Cholesky reformulation (GPTQ §3 step 3, eq. 5): the rows of the upper Cholesky
factor U of H^-1 (H^-1 = Uᵀ U) are exactly the rows the sequence of OBS
updates needs, so

    err_j  = (w_j - q_j) / U_jj ;   W[:, k] -= err_j * U_jk   for k > j.     (5)

Lazy batch updates (GPTQ §3 step 2, eq. 4): inside a block of B columns the
updates touch only the block; the rest of W is updated once per block:

    W[:, block_end:] -= Err_block @ U[block, block_end:]                      (4)

The pieces, in the order a method uses them:

1. prepare(W, H, percdamp, act_order): dead inputs (H_jj == 0: H_jj = 1 and
   W[:, j] = 0, as the reference code), the act-order permutation (largest
   diag(H) first, ties by index), the damped inverse Cholesky factor U (with
   retries, inverse_cholesky) and Wt = W[:, perm]ᵀ (n, out), so that a
   column is a contiguous row.
2. sweep(Wt, U, blocksize, quantize_columns, ...): the blocked loop (4); the
   method's numba kernel quantize_columns(j0, j1, b0, b1, Err) runs its step
   on columns j0..j1-1 and calls obs_update (5) after each column.  Optional
   hooks: fit_group(j, cols) when a group of group_size columns starts
   (cols = the group's columns brought up to date, also past the block, so
   grids never depend on blocksize), start_block(b0, b1) before a block.

Why a kernel per method and not one numba loop taking the step as a function
argument: numba keys a compiled function that takes another jitted function
by that function's address, so its on-disk cache never hits (tried with
numba 0.68: a cache miss and a full compile of the loop in every process,
i.e. in every CLI call and test subprocess).  The shared numba part is
obs_update; the Python loop around the kernels is sweep.

Everything runs in float64 and sequentially (deterministic).
"""

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg.lapack
from numba import njit

from refq.errors import RefqError

MAX_RETRIES = 4  # percdamp, x10, x100, x1000, x10000


class DampingWarning(UserWarning):
    """The Hessian needed more damping than asked for to be factorised."""


# ---------------------------------------------------------------------------
# 1. preparing: dead inputs, act order, inverse Cholesky factor
# ---------------------------------------------------------------------------
def inverse_cholesky(H, percdamp, name=""):
    """H (n, n) float64 (dead channels already fixed) -> (U, percdamp_used, retries).

    U is upper triangular with H_damped^-1 = Uᵀ U, H_damped = H + percdamp *
    mean(diag H) * I.  If the factorisation fails, percdamp is multiplied by 10
    (up to MAX_RETRIES times) and a DampingWarning names the layer and the
    damping used.

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
                          f"(damping {p * mean_diag:.4g})", DampingWarning, stacklevel=4)
        return U, p, attempt
    raise RefqError(f"{name or 'gptq'}: Hessian is not positive definite even with "
                    f"percdamp={p / 10:g}; check the calibration data")


@dataclass
class Prepared:
    """What prepare() returns."""
    W: np.ndarray           # (out, n) float64  W with dead inputs zeroed, original column order
    Wt: np.ndarray          # (n, out) float64  W[:, perm]ᵀ: processing-order column j = row j
    U: np.ndarray           # (n, n)   float64  upper Cholesky factor of the damped H[perm][:, perm]^-1
    perm: np.ndarray        # (n,)     int64    processing order (identity without act_order)
    dead: np.ndarray        # (n,)     bool     inputs with H_jj == 0
    percdamp_used: float
    retries: int

    def info(self, name):
        """The info entries every GPTQ-family method records."""
        return {"name": name, "percdamp_used": float(self.percdamp_used),
                "damping_retries": int(self.retries), "dead_inputs": int(self.dead.sum())}


def prepare(W, H, percdamp, act_order, name=""):
    """W (out, n) float64, H (n, n) float64 (not modified) -> Prepared."""
    n = W.shape[1]
    W = W.copy()                                 # (out, n)
    H = H.copy()                                 # (n, n)
    dead = np.diag(H) == 0                       # inputs that never fire
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if act_order:                                # largest diag(H) first; stable ties
        perm = np.argsort(-np.diag(H), kind="stable")
        H = H[perm][:, perm]
    else:
        perm = np.arange(n)
    U, p_used, retries = inverse_cholesky(H, percdamp, name)
    Wt = np.ascontiguousarray(W[:, perm].T)      # (n, out)
    return Prepared(W, Wt, U, perm, dead, p_used, retries)


# ---------------------------------------------------------------------------
# 2. the column loop: the OBS update of one column (numba), the blocked sweep
# ---------------------------------------------------------------------------
@njit(cache=True)
def obs_update(Wt, U, Err, q, j, block_start, block_end):
    """Column j was set to q (out,): record its error, update the block's later columns.

    Wt  (n, out) float64  row j = column j; on return row j holds q
    U   (n, n)   float64  upper Cholesky factor of the damped H^-1
    Err (B, out) float64  out: row j - block_start = (w_j - q_j) / U_jj
    """
    out = Wt.shape[1]
    d = U[j, j]
    e = j - block_start
    for r in range(out):
        Err[e, r] = (Wt[j, r] - q[r]) / d          # err_j = (w_j - q_j) / U_jj   (5)
        Wt[j, r] = q[r]
    for k in range(j + 1, block_end):              # W[:, k] -= err_j U_jk, k in block  (5)
        u = U[j, k]
        if u != 0.0:
            for r in range(out):
                Wt[k, r] -= Err[e, r] * u


def sweep(Wt, U, blocksize, quantize_columns, group_size=None, fit_group=None, start_block=None):
    """GPTQ's blocked column loop (Algorithm 1) over Wt (n, out), in place.

    quantize_columns(j0, j1, b0, b1, Err): the method's kernel; quantizes the
        processing-order columns j0..j1-1 of the block [b0, b1), calling
        obs_update after each; Err (B, out) holds the block's scaled errors.
    group_size, fit_group(j, cols): when given, a group starts at every column
        j with j % group_size == 0; fit_group gets cols (m, out), the group's
        columns as updated by ALL earlier columns (those past the block get the
        block's pending updates first), and the kernel runs one group at a time.
    start_block(b0, b1): called before each block (e.g. SparseGPT's mask).
    On return row j of Wt holds the q_j of the kernel.
    """
    n, out = Wt.shape
    g = group_size
    Err = np.zeros((min(blocksize, n), out))     # (B, out) errors of the current block
    for b0 in range(0, n, blocksize):            # blocks (lazy batch updates, eq. 4)
        b1 = min(b0 + blocksize, n)
        if start_block is not None:
            start_block(b0, b1)
        j = b0
        while j < b1:
            stop = b1
            if g is not None:
                if j % g == 0:                   # a group starts: its grid is fit now
                    ge = min(j + g, n)
                    cols = Wt[j:ge].copy()       # (<=g, out) up to date within the block
                    if ge > b1:                  # columns past the block: apply pending updates
                        cols[b1 - j:] -= U[b0:j, b1:ge].T @ Err[:j - b0]
                    fit_group(j, cols)
                stop = min(b1, (j // g + 1) * g)
            quantize_columns(j, stop, b0, b1, Err)
            j = stop
        if b1 < n:                               # W[:, b1:] -= Err_block @ U[block, b1:]  (4)
            Wt[b1:] -= U[b0:b1, b1:].T @ Err[:b1 - b0]
