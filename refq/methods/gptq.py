"""GPTQ: one-shot quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023
(arXiv 2210.17323); reference code IST-DASLab/gptq gptq.py `fasterquant`.

Objective (paper eq. 1), per linear layer, with H = mean x xᵀ:

    min_Q  tr((W - Q) H (W - Q)ᵀ)      Q on a per-(row, group) uniform grid

Columns are quantized one at a time, in order (or by decreasing diag(H) with
act_order); after column j is rounded, the not-yet-quantized columns absorb its
error through the inverse Hessian (OBS update, paper eq. 2-3), in GPTQ's
Cholesky form (eq. 5) with lazy batch updates (eq. 4): the loop all of
GPTQ's family shares, written once in refq.methods.gptq_skeleton.  What is
GPTQ's own is the step of column j (uniform grid of rtn):

    q_j    = s_g (clamp(round(w_j / s_g) + z_g, 0, 2^b - 1) - z_g)
    err_j  = (w_j - q_j) / U_jj ;   W[:, k] -= err_j * U_jk   for k > j     (eq. 5)

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
  DampingWarning names the layer and the damping used; info records it
  (refq.methods.gptq_skeleton.inverse_cholesky).
- The grid of each column is the min-max quantizer of refq.methods.rtn, so
  with H = identity GPTQ returns exactly RTN's codes.
"""

import time

import numpy as np
from numba import njit

from refq.methods import rtn
from refq.methods.rtn import find_params, group_bounds
from refq.options import ACT_ORDER, BLOCKSIZE, PERCDAMP, Option, defaults
from refq.formats.uniform import UniformWeight
from refq.methods.gptq_skeleton import (MAX_RETRIES, DampingWarning,  # noqa: F401 (re-exported)
                                        inverse_cholesky, obs_update, prepare, sweep)
from refq.numeric import layer_loss

OPTIONS = rtn.OPTIONS + (
    ACT_ORDER,
    Option("static_groups", "bool", False, "fit every group's grid up front on the original W "
           "(needs --group-size)"),
    PERCDAMP,
    BLOCKSIZE,
)
DEFAULTS = defaults(OPTIONS)


def validate(opts, given=()):
    """Checks across options (refq.api.validate_options calls it; `given`: the
    options set explicitly on the command line). -> error text or None."""
    if opts["static_groups"] and opts["group_size"] is None:
        return "static_groups needs group_size (--group-size)"


# ---------------------------------------------------------------------------
# numba kernel: GPTQ's step on a run of columns that share their groups' grids
# (paper Algorithm 1, inner loop)
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
    qhat = np.empty(out)                           # (out,) q_j
    for j in range(j0, j1):
        g = gidx[j]
        for r in range(out):
            s = scales[g, r]
            z = zeros[g, r]
            q = np.rint(Wt[j, r] / s) + z          # q = clamp(round(w/s) + z, 0, maxq)
            if q < 0.0:
                q = 0.0
            elif q > maxq:
                q = float(maxq)
            codes_t[j, r] = np.uint8(q)
            qhat[r] = s * (q - z)                  # q_hat = s (q - z)
        obs_update(Wt, U, Err, qhat, j, block_start, block_end)   # err_j, W[:, k>j] (eq. 5)


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def quantize_gptq(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 (mean x xᵀ) -> UniformWeight."""
    bits, g_size, sym, mse = opts["bits"], opts["group_size"], opts["sym"], opts["mse"]
    act_order, static = opts["act_order"], opts["static_groups"]
    tick = time.perf_counter()
    maxq = 2 ** bits - 1
    out, n = W.shape
    prep = prepare(W, H, opts["percdamp"], act_order, name)   # dead inputs, perm, U, Wt
    perm = prep.perm

    g = g_size or n
    bounds = group_bounds(n, g_size)             # groups in STORED column order
    G = len(bounds)
    scales = np.empty((G, out))                  # (G, out)
    zeros = np.empty((G, out))                   # (G, out)
    if static:                                   # all grids up front, original order
        for gi, (c0, c1) in enumerate(bounds):
            scales[gi], zeros[gi] = find_params(prep.W[:, c0:c1], bits, sym, mse, name)
    # group of each processing-order column: static -> original column // g;
    # otherwise groups are runs of g columns in processing order
    gidx = (perm // g) if static else (np.arange(n) // g)
    gidx = gidx.astype(np.int64)
    codes_t = np.zeros((n, out), dtype=np.uint8) # (n, out)

    def fit_group(j, cols):                      # a group starts: fit its grid now
        scales[j // g], zeros[j // g] = find_params(cols.T, bits, sym, mse, name)

    def quantize_columns(j0, j1, b0, b1, Err):
        _quantize_columns(prep.Wt, prep.U, Err, codes_t, scales, zeros, gidx, maxq, j0, j1, b0, b1)

    sweep(prep.Wt, prep.U, opts["blocksize"], quantize_columns,
          group_size=None if static else g, fit_group=fit_group)

    codes = codes_t.T                            # (out, n) processing order
    stored_perm = None
    if act_order:
        if g_size is not None and not static:    # groups follow the processing order
            stored_perm = perm
        else:                                    # grids do not depend on the order
            codes = codes[:, np.argsort(perm)]
    qw = UniformWeight.from_codes(np.ascontiguousarray(codes), scales.T, zeros.T, bits, g_size,
                                  sym, perm=stored_perm, method="gptq", options=opts,
                                  info=prep.info(name))
    qw.info["seconds"] = time.perf_counter() - tick
    qw.info["loss"] = layer_loss(W, qw.dequantize(), H)
    return qw
