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
calibration.  Shape-dependent errors are raised by the method itself; a method
whose options can rule out a layer shape also gives check_shape(shape, opts,
name), which `refq quantize` runs on every linear before calibrating.
"""

from dataclasses import dataclass, field
from typing import Callable

from refq.methods import claq, gptq, rtn
from refq.methods import quantease, spqr, squeezellm
from refq.methods import slim, sparsity
from refq.methods import aqlm


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
    # check_shape((out, in), opts, name) raises a one-line RefqError when a layer of this
    # shape cannot take these options (run on every linear before any calibration)
    check_shape: Callable = None


METHODS = {
    "rtn": Method(rtn.quantize_rtn, rtn.DEFAULTS, needs_hessian=False),
    "gptq": Method(gptq.quantize_gptq, gptq.DEFAULTS, needs_hessian=True,
                   validate=gptq.validate),
    "slim-quant": Method(slim.quantize_slim_quant, slim.SLIM_QUANT_DEFAULTS, needs_hessian=False,
                         checks=slim.SLIM_QUANT_CHECKS),
    "slim": Method(slim.quantize_slim, slim.SLIM_DEFAULTS, needs_hessian=True,
                   checks=slim.SLIM_CHECKS, casts=slim.SLIM_CASTS, validate=slim.validate_slim,
                   check_shape=sparsity.check_layer_shape),
    "wanda": Method(sparsity.prune_wanda, sparsity.DEFAULTS, needs_hessian=True,
                    checks=sparsity.CHECKS, casts=sparsity.CASTS,
                    check_shape=sparsity.check_layer_shape),
    "sparsegpt": Method(sparsity.prune_sparsegpt, sparsity.SPARSEGPT_DEFAULTS, needs_hessian=True,
                        checks=sparsity.CHECKS, casts=sparsity.CASTS,
                        validate=sparsity.validate_sparsegpt,
                        check_shape=sparsity.check_layer_shape),
    "magnitude": Method(sparsity.prune_magnitude, sparsity.DEFAULTS, needs_hessian=False,
                        checks=sparsity.CHECKS, casts=sparsity.CASTS,
                        check_shape=sparsity.check_layer_shape),
    "claq": Method(claq.quantize_claq, claq.DEFAULTS, needs_hessian=True, checks=claq.CHECKS,
                   casts=claq.CASTS, validate=claq.validate, api_only=claq.API_ONLY),
    "quantease": Method(quantease.quantize_quantease, quantease.DEFAULTS, needs_hessian=True,
                        checks=quantease.CHECKS, casts=quantease.CASTS),
    "spqr": Method(spqr.quantize_spqr, spqr.DEFAULTS, needs_hessian=True,
                   checks=spqr.CHECKS, casts=spqr.CASTS, check_shape=spqr.check_shape),
    "squeezellm": Method(squeezellm.quantize_squeezellm, squeezellm.DEFAULTS, needs_hessian=True,
                         checks=squeezellm.CHECKS, casts=squeezellm.CASTS),
    "aqlm": Method(aqlm.quantize_aqlm, aqlm.DEFAULTS, needs_hessian=True,
                   checks=aqlm.CHECKS, casts=aqlm.CASTS, check_shape=aqlm.check_shape),
}
