"""Public Python API:

    quantize_weight(W, H, method, **options) -> QuantizedWeight
    layer_loss(W, Q, H) -> float
    QuantizedWeight, load_quantized(tensors, meta)

Options: each method's OPTIONS table (refq/options.py, at the top of
refq/methods/<method>.py) gives every option's type, default, range, whether
None is allowed and what it means; `refq quantize --method M --help` prints it.
Types are strict (True is not 1, "false" is not False, 4.0 is not an integer);
a value is checked, then stored as a plain JSON type.  Options shared by the
quantizers: bits (2..8), group_size (None: one grid per output row, or columns
per group), sym, mse.
Any method:
    name           tensor name used in error messages and info (not stored
                   in options)
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, load_quantized
from refq.methods import METHODS
from refq.options import Invalid
from refq.numeric import layer_loss

__all__ = ["quantize_weight", "layer_loss", "QuantizedWeight", "load_quantized", "METHODS"]


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
    try:
        METHODS[method].table[key].check(value)
    except Invalid as e:
        return str(e)


def validate_options(method, options, prefix="", given=()):
    """Defaults filled in, every option checked, then cast -> dict (RefqError if invalid).

    given: the options named explicitly on the command line or in a compare
    SPEC; one of them that has no effect given the others is an error there.
    The API passes none: an option dict stored in a checkpoint or a golden
    manifest holds every option, also those without effect."""
    spec = METHODS[method]
    table = spec.table
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise RefqError(f"{prefix}unknown option {unknown[0]!r} for method {method!r} "
                        f"(known: {', '.join(sorted(table))})")
    opts = {}
    for key, opt in table.items():
        try:
            opts[key] = opt.check(options.get(key, opt.default))
        except Invalid as e:
            raise RefqError(f"{prefix}option {key} {e}") from None
    msg = spec.validate(opts, frozenset(given)) if spec.validate else None
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
