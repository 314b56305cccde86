"""Quantization methods: one file per method, registered in METHODS.

A method is a function fn(W, H, opts, name) -> QuantizedWeight with
  W     (out, in) float64, already validated (finite)
  H     (in, in) float64 mean x xᵀ, or None when the method does not need it
  opts  dict of every option of the method (defaults filled in, validated)
  name  tensor name for messages ("" if not given)
Adding a method = one line below (its defaults dict lists its options; its
checks/casts dicts validate the options that refq.api.OPTION_CHECKS does not
know, or knows differently, e.g. CLAQ's fractional average `bits`).
Option checks must not depend on the weight's shape: they run before any
calibration.  Shape-dependent errors are raised by the method itself.
"""

from dataclasses import dataclass, field
from typing import Callable

from refq.methods import claq, gptq, rtn


@dataclass(frozen=True)
class Method:
    fn: Callable            # fn(W, H, opts, name) -> QuantizedWeight
    defaults: dict          # option name -> default; any other option is an error
    needs_hessian: bool
    # option -> check(value) -> error text or None, for options this method
    # checks differently from (or in addition to) refq.api.OPTION_CHECKS
    checks: dict = field(default_factory=dict)
    # option -> cast(value), to plain JSON-serialisable Python values
    casts: dict = field(default_factory=dict)
    # validate(opts) -> error text or None: checks that involve several options
    validate: Callable = None
    # options of the Python API only (no command-line flag), e.g. per-column lists
    api_only: frozenset = frozenset()


METHODS = {
    "rtn": Method(rtn.quantize_rtn, rtn.DEFAULTS, needs_hessian=False),
    "gptq": Method(gptq.quantize_gptq, gptq.DEFAULTS, needs_hessian=True,
                   validate=gptq.validate),
    "claq": Method(claq.quantize_claq, claq.DEFAULTS, needs_hessian=True, checks=claq.CHECKS,
                   casts=claq.CASTS, validate=claq.validate, api_only=claq.API_ONLY),
}
