"""SpQR: GPTQ with small groups, quantized group statistics and sparse outliers.

Dettmers, Svirschevski, Egiazarian, Kuznedelev, Frantar, Ashkboos, Borzunov,
Hoefler, Alistarh, "SpQR: A Sparse-Quantized Representation for Near-Lossless
LLM Weight Compression" (arXiv 2306.03078); reference code Vahe1994/SpQR
spqr_engine.py (`SPQRUtil.quantize`, `get_leave_one_out_error`),
quant_groups.py.

Objective: GPTQ's (paper eq. 1), min tr((W - Ŵ) H (W - Ŵ)ᵀ), with

    Ŵ = dense_part + S,   dense_part on a per-(row, group of g columns) grid,
    S sparse (the outliers, kept in float16).

Algorithm (paper Alg. 1), on the GPTQ skeleton (refq.methods.gptq_skeleton:
Cholesky factor U of H⁻¹, lazy blocks of 128 columns, act_order):

1. Small groups: every g = group_size columns (processing order) a new
   min-max grid per row (3-4 bits; the grid of refq.methods.rtn), fit when the
   group starts on the weights as updated by all earlier columns.
2. Outlier criterion (paper §4.1, eq. 6-7): a weight is an outlier when its
   GPTQ error is large,

       ((w_rj - q(w_rj)) / U_jj)²  >  τ · mean_j( var_r(W[:, j]) / U_jj² )

   with τ = outlier_threshold (0.2; the right side is the official
   `outlier_scale`, var with ddof 1 over the rows, on W after act_order).
   An outlier keeps its value: S[r, j] = fp16(w_rj - q(w_rj)), so Ŵ_rj =
   q(w_rj) + S_rj ≈ w_rj, and its (tiny) error is what GPTQ compensates.
3. Group statistics without outliers (leave_one_out, the official default):
   before fitting a group's grid, for each weight t of each row, the
   squared GPTQ error of the row's group with the grid fit WITHOUT t,

       loo[r, t] = Σ_{c ≠ t} ((x_rc - q_{-t}(x_rc)) / U_cc)²

   is compared with the error with the full grid; weights whose removal
   lowers it by more than the threshold above are likely outliers, and the
   grid is fit without them (replaced by the mean of the row's other weights
   of the group, as the official code; with fp16 statistics refq sets them
   to 0, which GPTQ's range always contains: exactly "leave them out").
4. Bilevel statistics (paper §4.1 "small groups with bilevel quantization"):
   per row r of a group, scale = (max - min) / maxq and a REAL-valued zero;
   the vector of scales of one column group (over the rows) is quantized
   min-max to qq_bits in blocks of qq_group_size consecutive rows,

       scale_hat[r] = lo + step · code[r],   lo = fp16(min), step = fp16((max - lo)/(2^qq - 1))

   (float32 arithmetic; every scale_hat > 0 because lo is), then the zero
   that centres [min, max] on the grid of the QUANTIZED scale,
   zero = maxq/2 - (min + max) / (2 scale_hat), is quantized the same way
   (the official code takes -min/scale with the unquantized scale; centring
   spreads the error of scale_hat over both ends of the range instead of
   clipping one end: measured lower loss).  Codes are then
   q = clamp(round(w / scale_hat + zero_hat), 0, 2^b - 1).
   qq_bits = None keeps GPTQ's statistics instead (fp16 scale, integer zero,
   range containing 0); then, with τ = inf, SpQR is exactly refq's GPTQ with
   the same groups (tests/test_spqr.py).

Stored ("spqr" format, refq/formats/spqr.py): b-bit codes, qq-bit scale and
zero codes with fp16 (lo, step) per (block of qg rows, column group), the
permutation, CSR outliers.  Bits per weight, everything stored counted:

    b + 2 qq/g + 2·32/(g·qg) + 16/out (perm) + 32 (out + 1 + nnz)/(out·in)

which is the paper's accounting, b + (qs + qz)/g + 2·32/(g·qg) + 32 · outlier
share, plus the permutation and the CSR row pointers it leaves out; e.g.
b = 3, g = qg = 16, qq = 3 on 576 x 576: 3.625 + 0.028 + 0.056 + 32 · share.
"""

import math
import time

import numpy as np
from numba import njit

from refq.errors import RefqError
from refq.formats.spqr import SpqrWeight
from refq.methods.gptq_skeleton import obs_update, prepare, sweep
from refq.methods.rtn import find_params
from refq.options import ACT_ORDER, BITS, GROUP_SIZE, PERCDAMP, SYM, Option, defaults, no_effect

from refq.numeric import FP16_TINY, layer_loss, round_fp16

OPTIONS = (
    BITS.but(default=3),
    GROUP_SIZE.but(default=16, none=None, help="input columns per group (small groups: 8-32)"),
    SYM,
    ACT_ORDER.but(default=True),
    PERCDAMP,
    Option("qq_bits", "int", 3, "bits of the quantized group statistics (scales and zeros)",
           range="[1, 8]", none="fp16 scales and integer zeros, as GPTQ"),
    Option("qq_group_size", "int", 16, "rows per second-level group of the statistics "
           "(needs --qq-bits)", range="[1, inf)"),
    Option("outlier_threshold", "float", 0.2, "tau: a weight whose removal lowers its group's "
           "error by more than tau times the mean is an outlier (inf: no outliers)",
           range="(0, inf]"),
    Option("leave_one_out", "bool", True, "fit each group's grid without its likely outliers"),
)
DEFAULTS = defaults(OPTIONS)

BLOCKSIZE = 128


def validate(opts, given=()):
    """Checks across options (refq.api.validate_options calls it; `given`: the
    options set explicitly on the command line). -> error text or None."""
    return (no_effect(given, ["qq_group_size"], opts["qq_bits"] is not None,
                      "the statistics are quantized (--qq-bits)")
            or no_effect(given, ["leave_one_out"], math.isfinite(opts["outlier_threshold"]),
                         "there are outliers (finite --outlier-threshold)"))


# ---------------------------------------------------------------------------
# numba kernel: GPTQ's column loop with the outlier criterion
# ---------------------------------------------------------------------------
@njit(cache=True)
def _quantize_columns(Wt, U, Err, codes_t, St, scales, zeros, gidx, maxq, thr, real_zero,
                      j0, j1, block_start, block_end):
    """Quantize processing-order columns j0..j1-1 inside the block [block_start, block_end).

    Wt      (n, out) float64  weights (row j = column j), updated in place
    U       (n, n)   float64  upper Cholesky factor of the damped H^-1
    Err     (B, out) float64  out: (w - ŵ) / U_jj of the block's columns
    codes_t (n, out) uint8    out: codes
    St      (n, out) float64  out: outlier values S (float16-representable), 0 elsewhere
    scales, zeros (G, out)    grid of each group;  gidx (n,) group of each column
    real_zero bool            zeros are real-valued (bilevel) rather than integers
    thr     float             outlier threshold on ((w - q(w)) / U_jj)²  (eq. 6-7)
    """
    out = Wt.shape[1]
    qhat = np.empty(out)                           # (out,) ŵ_j: dense part + outlier
    for j in range(j0, j1):
        d = U[j, j]
        g = gidx[j]
        for r in range(out):
            w = Wt[j, r]
            s = scales[g, r]
            z = zeros[g, r]
            if real_zero:                          # bilevel: quantized real-valued zero
                q = np.rint(w / s + z)             # q = clamp(round(w/s + z), 0, maxq)
            else:
                q = np.rint(w / s) + z             # q = clamp(round(w/s) + z, 0, maxq) (GPTQ)
            if q < 0.0:
                q = 0.0
            elif q > maxq:
                q = float(maxq)
            codes_t[j, r] = np.uint8(q)
            wq = s * (q - z)
            err = (w - wq) / d                     # GPTQ error (eq. 5)
            if err * err > thr:                    # outlier (eq. 6-7): keep w (as dense + fp16 S)
                sv = round_fp16(w - wq)
                St[j, r] = sv
                wq += sv
            qhat[r] = wq
        obs_update(Wt, U, Err, qhat, j, block_start, block_end)   # err_j, W[:, k>j] (GPTQ eq. 5)


# ---------------------------------------------------------------------------
# group statistics
# ---------------------------------------------------------------------------
def _group_error(x, scale, zero, maxq, dinv2, real_zero):
    """Σ_c ((x_c - q(x_c)) / U_cc)² per row: x (rows, m), scale/zero (rows,), dinv2 (rows, m) or (m,)."""
    if real_zero:
        q = np.clip(np.rint(x / scale[:, None] + zero[:, None]), 0, maxq)
    else:
        q = np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, maxq)
    return np.sum((x - scale[:, None] * (q - zero[:, None])) ** 2 * dinv2, axis=1)


def _loo_grid(x, bits, sym, real_zero, name):
    """First-level grid of each row of x (rows, m) for the leave-one-out test:
    GPTQ's (integer zero) or, for bilevel statistics, min-max with a real zero."""
    if not real_zero or sym:
        return find_params(x, bits, sym, False, name)
    maxq = 2 ** bits - 1
    xmin, xmax = x.min(axis=1), x.max(axis=1)
    flat = xmin == xmax
    xmin, xmax = np.where(flat, xmin - 1, xmin), np.where(flat, xmax + 1, xmax)
    scale = (xmax - xmin) / maxq
    return scale, -xmin / scale


def likely_outliers(X, d, bits, sym, thr, real_zero=False, name=""):
    """Leave-one-out test of one group (step 3).  X (out, m) current weights of
    the group's columns, d (m,) their U_jj -> (out, m) bool.

    reduction[r, t] = err(row r, grid on all m) - err(row r without t, grid without t)
    """
    out, m = X.shape
    maxq = 2 ** bits - 1
    dinv2 = 1.0 / d ** 2                                            # (m,)
    s, z = _loo_grid(X, bits, sym, real_zero, name)
    base = _group_error(X, s, z, maxq, dinv2, real_zero)            # (out,)
    if m == 1:
        return base > thr                                           # alone: no grid left to fit
    keep = np.array([[c for c in range(m) if c != t] for t in range(m)])   # (m, m-1)
    Xl = X[:, keep].reshape(out * m, m - 1)                         # row (r, t): row r without t
    sl, zl = _loo_grid(Xl, bits, sym, real_zero, name)
    loo = _group_error(Xl, sl, zl, maxq, np.tile(dinv2[keep], (out, 1)), real_zero).reshape(out, m)
    return (base[:, None] - loo) > thr


def quantize_stat(v, qq_bits, qq_group):
    """Second level (step 4): v (out,) -> (codes (out,) int64, lo (R,) fp16, step (R,) fp16,
    v_hat (out,) float64 = float32(lo + step * code)), R = ceil(out / qq_group):
    min-max over each block of qq_group rows, codes the nearest level."""
    out = v.shape[0]
    maxqq = 2 ** qq_bits - 1
    R = -(-out // qq_group)
    lo = np.empty(R, np.float16)
    step = np.empty(R, np.float16)
    fp16_max = float(np.finfo(np.float16).max)
    for b in range(R):                                  # stored as float16: saturate, never inf
        blk = v[b * qq_group:(b + 1) * qq_group]
        lo[b] = np.float16(np.clip(blk.min(), -fp16_max, fp16_max))
        step[b] = np.float16(np.clip((blk.max() - float(lo[b])) / maxqq, 0.0, fp16_max))
    lo_r = np.repeat(lo, qq_group)[:out].astype(np.float64)
    step_r = np.repeat(step, qq_group)[:out].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step_r > 0, np.rint((v - lo_r) / step_r), 0.0)
    codes = np.clip(codes, 0, maxqq).astype(np.int64)
    return codes, lo, step, dequantize_stat(codes, lo, step, qq_group).astype(np.float64)


def dequantize_stat(codes, lo, step, qq_group):
    """codes (out,), lo/step (R,) float16 -> (out,) float32 = lo + step * code (float32 arithmetic)."""
    out = codes.shape[0]
    lo32 = np.repeat(lo.astype(np.float32), qq_group)[:out]
    st32 = np.repeat(step.astype(np.float32), qq_group)[:out]
    return lo32 + st32 * codes.astype(np.float32)


def fit_group(X, bits, sym, qq_bits, qq_group, name=""):
    """Grid of one group: X (out, m) (outliers already set to 0) ->
    scale (out,), zero (out,) float64, and the second level
    ((scale codes, lo, step, hat), (zero codes, lo, step, hat) or None), or None.

    qq_bits None: GPTQ's grid (refq.methods.rtn.find_params: range containing 0,
    fp16 scale, integer zero).  qq_bits set (bilevel, step 4): scale =
    (max - min) / maxq quantized first, then the real-valued zero that centres
    [min, max] on the grid for the QUANTIZED scale,
        zero = maxq/2 - (min + max) / (2 scale_hat),
    quantized too (the official code uses -min/scale with the unquantized
    scale; centring spreads the error of the quantized scale over both ends of
    the range instead of clipping one: measured lower loss)."""
    maxq = 2 ** bits - 1
    scale, zero = find_params(X, bits, sym, False, name)             # GPTQ's min-max grid
    if qq_bits is None:
        return scale, zero, None
    xmin, xmax = X.min(axis=1), X.max(axis=1)
    if not sym:
        flat = xmin == xmax                                          # constant row: width 2
        xmin, xmax = np.where(flat, xmin - 1, xmin), np.where(flat, xmax + 1, xmax)
        # a nearly constant row far from 0 (range < |centre| 2^-11 maxq) would need a
        # zero beyond float16's range (zero ~ centre / scale): widen it about its centre
        # to that minimum, so |zero| stays below ~2^11
        centre, half = (xmin + xmax) / 2, (xmax - xmin) / 2
        half = np.maximum(half, np.abs(centre) * maxq * 2.0 ** -12)
        xmin, xmax = centre - half, centre + half
        scale = (xmax - xmin) / maxq
    sq = quantize_stat(scale, qq_bits, qq_group)
    scale = np.maximum(sq[3], FP16_TINY)                            # > 0 (lo > 0 already)
    if sym:
        return scale, zero, (sq, None)
    zero = maxq / 2 - (xmin + xmax) / (2 * scale)
    zq = quantize_stat(zero, qq_bits, qq_group)
    return scale, zq[3], (sq, zq)


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def check_shape(shape, opts, name=""):
    """RefqError (one line, before calibration) when group_size does not divide in_features."""
    out, n = shape
    if n % opts["group_size"]:
        raise RefqError(f"{name or 'spqr'}: group_size {opts['group_size']} does not divide "
                        f"in_features {n} (--group-size: spqr needs whole groups)")


def quantize_spqr(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 -> SpqrWeight."""
    tick = time.perf_counter()
    bits, g, sym = opts["bits"], opts["group_size"], opts["sym"]
    qq_bits, qg = opts["qq_bits"], opts["qq_group_size"]
    tau = opts["outlier_threshold"]
    out, n = W.shape
    check_shape(W.shape, opts, name)
    maxq = 2 ** bits - 1
    prep = prepare(W, H, opts["percdamp"], opts["act_order"], name)   # dead inputs, perm, U, Wt
    Wt, U, perm = prep.Wt, prep.U, prep.perm
    Ud = np.diag(U).copy()                          # (n,)

    # threshold (eq. 7): τ · mean over columns of var_r(W[:, j]) / U_jj²
    outlier_scale = float(np.mean(np.var(Wt, axis=1, ddof=1) / Ud ** 2)) if out > 1 else 0.0
    thr = tau * outlier_scale if math.isfinite(tau) else np.inf

    G = n // g
    scales = np.empty((G, out))                     # (G, out) as used (quantized if qq)
    zeros = np.empty((G, out))
    R = -(-out // qg)
    # second level (qq_bits set): codes (G, out) and (lo, step) (G, R) of scales and zeros
    second = {k: np.zeros((G, out), np.int64) for k in ("scale_codes", "zero_codes")}
    second.update({k: np.zeros((G, R), np.float16)
                   for k in ("scale_lo", "scale_step", "zero_lo", "zero_step")})
    gidx = (np.arange(n) // g).astype(np.int64)
    codes_t = np.zeros((n, out), np.uint8)
    St = np.zeros((n, out))

    def start_group(j, cols):                       # a group starts: steps 3-4 on its columns
        X = cols.T                                  # (out, g) brought up to date
        if np.isfinite(thr) and opts["leave_one_out"]:
            likely = likely_outliers(X, Ud[j:j + g], bits, sym, thr, qq_bits is not None, name)
            if qq_bits is None:                     # 0 is in GPTQ's range: zero = left out
                X = np.where(likely, 0.0, X)
            else:                                   # the official: the mean of the others
                cnt = np.maximum((~likely).sum(axis=1, keepdims=True), 1)
                mean = np.where(likely, 0.0, X).sum(axis=1, keepdims=True) / cnt
                X = np.where(likely, mean, X)
        gi = j // g
        scales[gi], zeros[gi], qq = fit_group(X, bits, sym, qq_bits, qg, name)
        if qq is not None:
            for what, part in zip(("scale", "zero"), qq):
                if part is not None:
                    (second[what + "_codes"][gi], second[what + "_lo"][gi],
                     second[what + "_step"][gi], _) = part

    def quantize_columns(j0, j1, b0, b1, Err):
        _quantize_columns(Wt, U, Err, codes_t, St, scales, zeros, gidx, maxq, thr,
                          qq_bits is not None, j0, j1, b0, b1)

    sweep(Wt, U, BLOCKSIZE, quantize_columns, group_size=g, fit_group=start_group)

    inv = np.argsort(perm)
    S = St.T[:, inv]                                # (out, n) original column order
    info = dict(prep.info(name), outlier_threshold_abs=float(thr))
    qw = SpqrWeight.from_parts(
        codes=np.ascontiguousarray(codes_t.T), bits=bits, group_size=g, sym=sym,
        scales=scales.T, zeros=zeros.T, qq_bits=qq_bits, qq_group_size=qg,
        second={k: v.T for k, v in second.items()},
        perm=perm if opts["act_order"] else None, S=S, options=opts, info=info)
    qw.info["outliers"] = qw.outliers.nnz
    qw.info["seconds"] = time.perf_counter() - tick
    qw.info["loss"] = layer_loss(W, qw.dequantize(), H)
    return qw
