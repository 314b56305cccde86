"""Math every method shares: the layer loss and float16 rounding.

A leaf module (it imports only numpy, numba and refq.errors), so that every
method imports it at the top and refq.api can import the methods without a
cycle.

    layer_loss(W, Q, H) = tr((W - Q) H (W - Q)ᵀ)     the objective of every method

float16 rounding: refq stores scales, codebooks and outlier values as IEEE
half precision, and several methods round to it BEFORE using a value, so that
their error feedback sees what the model will use:

    fp16(x)         numpy arrays: nearest float16 (ties to even) as float64;
                    beyond ±65504: ±inf (numpy's cast), or ±65504 with saturate
    round_fp16(x)   the same rounding on one float inside numba kernels
                    (numba has no float16 type); equals float(np.float16(x))
"""

import math

import numpy as np
from numba import njit

from refq.errors import RefqError

FP16_MAX = 65504.0                                    # largest finite float16
FP16_TINY = float(np.float16(2.0 ** -24))             # smallest positive float16 (subnormal)


def layer_loss(W, Q, H):
    """trace((W - Q) H (W - Q)ᵀ) in float64.  W, Q (out, in); H (in, in)."""
    E = np.asarray(W, dtype=np.float64) - np.asarray(Q, dtype=np.float64)   # (out, in)
    H = np.asarray(H, dtype=np.float64)
    if E.ndim != 2 or H.shape != (E.shape[1], E.shape[1]):
        raise RefqError(f"layer_loss: shapes W {np.shape(W)}, Q {np.shape(Q)}, H {H.shape} do not match")
    return float(np.sum((E @ H) * E))


def fp16(x, saturate=False):
    """x (array) rounded to the nearest float16, as float64.  saturate: clip to ±65504 first."""
    x = np.asarray(x)
    if saturate:
        x = np.clip(x, -FP16_MAX, FP16_MAX)
    return x.astype(np.float16).astype(np.float64)


@njit(cache=True)
def round_fp16(x):
    """float64 -> the nearest float16 value (ties to even), as float64; |x| > 65504 -> ±inf."""
    if x == 0.0 or not np.isfinite(x):
        return x
    m, e = math.frexp(abs(x))                 # |x| = m 2^e, m in [0.5, 1)
    e = max(e - 1, -14)                       # exponent of |x|; subnormals share 2^-14
    quantum = 2.0 ** (e - 10)                 # spacing of float16 in that binade (11 bits)
    y = np.rint(x / quantum) * quantum        # exact: quantum is a power of two
    if abs(y) > 65504.0:
        return np.inf if y > 0 else -np.inf
    return y
