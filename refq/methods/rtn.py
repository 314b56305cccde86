"""RTN: round-to-nearest with a min-max uniform grid per output row (or per group).

Objective: none beyond the grid itself; every weight is rounded independently.
This file also holds the min-max quantizer that GPTQ uses for each column, so
the two methods share one definition (and give identical codes when GPTQ has
nothing to compensate, e.g. H = identity).

The quantizer follows IST-DASLab/gptq quant.py (`Quantizer.find_params`):

    maxq  = 2^b - 1
    xmin  = min(min_j w_j, 0),  xmax = max(max_j w_j, 0)       (range contains 0)
    sym:    xmax = max(|xmin|, xmax);  xmin = -xmax  if xmin < 0
            (a row with no negative weight keeps xmin = 0: GPTQ's convention,
             followed so results compare with the official code)
    xmin = -1, xmax = +1  when both are 0 (an all-zero row)
    scale = (xmax - xmin) / maxq
    zero  = round(-xmin / scale)            (asym)      zero = (maxq + 1) / 2 = 2^(b-1)  (sym)
    q     = clamp(round(w / scale) + zero, 0, maxq)      W_hat = scale * (q - zero)

refq stores scales as float16, so the scale is rounded to float16 *before*
the zero and the codes are computed (GPTQ then compensates the error of the
weights that are actually stored).  round() is round-half-to-even, as torch.

mse=True (quant.py's clipping search): for i = 0 .. int(maxshrink*grid)-1,
p = 1 - i/grid, try the range (p*xmin, p*xmax) (sym: zero kept at 2^(b-1)),
and keep, per row, the candidate with the smallest sum_j |W_hat_j - w_j|^2.4.
i = 0 is plain min-max, so the search is never worse in that norm.
"""

import numpy as np

from refq.errors import RefqError
from refq.options import BITS, GROUP_SIZE, MSE, SYM, defaults
from refq.formats.uniform import UniformWeight

GRID = 100
MAXSHRINK = 0.8
NORM = 2.4

OPTIONS = (BITS, GROUP_SIZE, SYM, MSE)          # refq/options.py
DEFAULTS = defaults(OPTIONS)

_FP16_TINY = float(np.float16(2.0 ** -24))  # smallest positive float16 (subnormal)
_FP16_MAX = float(np.finfo(np.float16).max)


def _scale_zero(xmin, xmax, maxq, sym, name=""):
    """Range (rows,) -> float16-representable scale (rows,) and integer zero (rows,), float64."""
    scale = (xmax - xmin) / maxq
    if np.any(scale > _FP16_MAX):
        raise RefqError(f"{name or 'weight'}: weight range too large for float16 scales "
                        f"(max |w| about {float(np.max(np.abs(np.stack([xmin, xmax])))):.3g})")
    scale = scale.astype(np.float16).astype(np.float64)
    scale = np.maximum(scale, _FP16_TINY)  # a range below float16's resolution: avoid 0
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.clip(np.rint(-xmin / scale), 0, maxq)
    return scale, zero


def quantize_codes(x, scale, zero, maxq):
    """x (rows, m), scale/zero (rows,) -> codes (rows, m) float64 integers in [0, maxq]."""
    return np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, maxq)


def dequantize_codes(q, scale, zero):
    """codes (rows, m), scale/zero (rows,) -> W_hat (rows, m) float64."""
    return scale[:, None] * (q - zero[:, None])


def find_params(x, bits, sym=False, mse=False, name=""):
    """Fit the grid of each row of x (rows, m) float64 -> scale (rows,), zero (rows,) float64."""
    maxq = 2 ** bits - 1
    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = np.maximum(x.max(axis=1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0] = -1.0
    xmax[both0] = +1.0
    scale, zero = _scale_zero(xmin, xmax, maxq, sym, name)
    if mse:
        best = np.full(x.shape[0], np.inf)
        for i in range(int(MAXSHRINK * GRID)):
            p = 1 - i / GRID
            s1, z1 = _scale_zero(p * xmin, p * xmax, maxq, sym, name)
            q = dequantize_codes(quantize_codes(x, s1, z1, maxq), s1, z1)
            err = np.sum(np.abs(q - x) ** NORM, axis=1)  # (rows,)
            better = err < best
            best[better] = err[better]
            scale[better] = s1[better]
            zero[better] = z1[better]
    return scale, zero


def group_bounds(n, group_size):
    """[(start, stop), ...] column ranges of the groups; the last one may be ragged."""
    g = group_size or n
    return [(c, min(c + g, n)) for c in range(0, n, g)]


def quantize_rtn(W, H, opts, name=""):
    """W (out, in) float64; H unused. -> UniformWeight."""
    bits, group_size, sym, mse = opts["bits"], opts["group_size"], opts["sym"], opts["mse"]
    maxq = 2 ** bits - 1
    out, n = W.shape
    bounds = group_bounds(n, group_size)
    codes = np.empty((out, n), dtype=np.uint8)          # (out, in)
    scales = np.empty((out, len(bounds)))                # (out, G)
    zeros = np.empty((out, len(bounds)))                 # (out, G)
    for gi, (c0, c1) in enumerate(bounds):
        s, z = find_params(W[:, c0:c1], bits, sym, mse, name)
        codes[:, c0:c1] = quantize_codes(W[:, c0:c1], s, z, maxq)
        scales[:, gi], zeros[:, gi] = s, z
    return UniformWeight.from_codes(codes, scales, zeros, bits, group_size, sym,
                                    method="rtn", options=opts, info={"name": name})
