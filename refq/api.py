"""Public Python API:

    quantize_weight(W, H, method, **options) -> QuantizedWeight
    layer_loss(W, Q, H) -> float
    QuantizedWeight, load_quantized(tensors, meta)

Options shared by the methods (underscored CLI names):
    bits           int 2..8, default 4
    group_size     None (one grid per output row) or columns per group; a
                   last group shorter than group_size is allowed
    sym            False: asymmetric min-max grid; True: zero fixed at 2^(b-1)
    mse            False; True: GPTQ's clipping grid search (norm 2.4)
gptq only:
    act_order (False), static_groups (False), percdamp (0.01), blocksize (128)
Any method:
    name           tensor name used in error messages and info (not stored
                   in options)
"""

import math

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, load_quantized
from refq.methods import METHODS
from refq.numeric import layer_loss

__all__ = ["quantize_weight", "layer_loss", "QuantizedWeight", "load_quantized", "METHODS"]


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_bits(v):
    if not _is_int(v) or not 2 <= v <= 8:
        return f"must be an integer in 2..8, got {v!r}"


def _check_group_size(v):
    if v is not None and (not _is_int(v) or v < 1):
        return f"must be None (per-channel) or a positive integer, got {v!r}"


def _check_bool(v):
    if not isinstance(v, (bool, np.bool_)):
        return f"must be True or False, got {v!r}"


def _check_percdamp(v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v) or v < 0:
        return f"must be a finite number >= 0, got {v!r}"


def _check_blocksize(v):
    if not _is_int(v) or v < 1:
        return f"must be a positive integer, got {v!r}"


# option name -> check(value) -> error text or None; options of later methods
# without an entry here are checked by the method itself
OPTION_CHECKS = {
    "bits": _check_bits,
    "group_size": _check_group_size,
    "sym": _check_bool,
    "mse": _check_bool,
    "act_order": _check_bool,
    "static_groups": _check_bool,
    "percdamp": _check_percdamp,
    "blocksize": _check_blocksize,
}

# normalise to plain Python types so that options stay JSON-serialisable
_CASTS = {"bits": int, "blocksize": int, "percdamp": float, "sym": bool, "mse": bool,
          "act_order": bool, "static_groups": bool,
          "group_size": lambda v: None if v is None else int(v)}


def _check_matrix(A, what, prefix, shape=None):
    A = np.asarray(A)
    if A.ndim != 2:
        raise RefqError(f"{prefix}{what} must be a 2-D matrix, got shape {A.shape}")
    if not np.issubdtype(A.dtype, np.floating):
        raise RefqError(f"{prefix}{what} must be floating point, got {A.dtype}")
    if shape is not None and A.shape != shape:
        raise RefqError(f"{prefix}{what} must have shape {shape}, got {A.shape}")
    if not np.all(np.isfinite(A)):
        bad = int(np.size(A) - np.count_nonzero(np.isfinite(A)))
        raise RefqError(f"{prefix}{what} contains {bad} NaN/Inf values")
    return A.astype(np.float64)


def option_error(method, key, value):
    """Error text for one option value of `method` (None if valid)."""
    spec = METHODS[method]
    check = spec.checks.get(key) or OPTION_CHECKS.get(key)
    return check(value) if check else None


def validate_options(method, options, prefix=""):
    """Defaults filled in, every option checked and cast -> dict (RefqError if invalid)."""
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise RefqError(f"{prefix}unknown option {unknown[0]!r} for method {method!r} "
                        f"(known: {', '.join(sorted(spec.defaults))})")
    opts = dict(spec.defaults)
    opts.update(options)
    for key, value in opts.items():
        msg = option_error(method, key, value)
        if msg:
            raise RefqError(f"{prefix}option {key} {msg}")
        cast = spec.casts.get(key) or _CASTS.get(key)
        if cast:
            opts[key] = cast(value)
    msg = spec.validate(opts) if spec.validate else None
    if msg:
        raise RefqError(f"{prefix}options: {msg}")
    return opts


def quantize_weight(W, H, method, **options):
    """Quantize one linear weight.

    W  (out, in) float32, y = x Wᵀ
    H  (in, in) float64, MEAN of x xᵀ over the calibration tokens (may be None
       for methods that do not use it, e.g. rtn)
    -> QuantizedWeight (format "uniform" for rtn / gptq); with H given, its
       info["loss"] is layer_loss(W, Q, H) (AQLM: the same, from its float64
       codebooks, as tracked in info["loss_history"])
    """
    name = options.pop("name", None) or ""
    prefix = f"{name}: " if name else ""
    if method not in METHODS:
        raise RefqError(f"{prefix}unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    spec = METHODS[method]
    opts = validate_options(method, options, prefix)
    W64 = _check_matrix(W, "W", prefix)
    if W64.size == 0:
        raise RefqError(f"{prefix}W is empty, shape {W64.shape}")
    H64 = None
    if H is not None:
        H64 = _check_matrix(H, "H", prefix, shape=(W64.shape[1], W64.shape[1]))
    elif spec.needs_hessian:
        raise RefqError(f"{prefix}method {method!r} needs the Hessian H (in, in), got None")
    qw = spec.fn(W64, H64, opts, name)
    if H64 is not None and qw.info.get("loss") is None:   # the methods that do not record it
        qw.info["loss"] = layer_loss(W64, qw.dequantize(), H64)
    return qw
