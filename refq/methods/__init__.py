"""Quantization methods: one file per method, registered in METHODS.

A method is a function fn(W, H, opts, name) -> QuantizedWeight with
  W     (out, in) float64, already validated (finite)
  H     (in, in) float64 mean x xᵀ, or None when the method does not need it
  opts  dict of every option of the method (defaults filled in, validated)
  name  tensor name for messages ("" if not given)
Adding a method = one line below.  Its options are the OPTIONS table at the
top of its file (refq/options.py: name, kind, default, range, none, help);
checks across options are one function beside it, validate(opts, given) ->
error text or None (`given`: the options named explicitly on the command line
or in a compare SPEC, so that an option without effect there is an error).
Option checks must not depend on the weight's shape: they run before any
calibration.  Shape-dependent errors are raised by the method itself; a method
whose options can rule out a layer shape also gives check_shape(shape, opts,
name), which `refq quantize` runs on every linear before calibrating.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from refq.methods import claq, gptq, rtn
from refq.methods import quantease, spqr, squeezellm
from refq.methods import slim, sparsity
from refq.methods import aqlm
from refq.options import defaults, table


@dataclass(frozen=True)
class Method:
    fn: Callable            # fn(W, H, opts, name) -> QuantizedWeight
    options: tuple          # (Option, ...): the method's OPTIONS table; any other option is an error
    needs_hessian: bool
    # validate(opts, given) -> error text or None: checks that involve several options
    validate: Callable = None
    # check_shape((out, in), opts, name) raises a one-line RefqError when a layer of this
    # shape cannot take these options (run on every linear before any calibration)
    check_shape: Callable = None

    @cached_property
    def table(self):
        """{option name: Option}"""
        return table(self.options)

    @property
    def defaults(self):
        """{option name: default}"""
        return defaults(self.options)


METHODS = {
    "rtn": Method(rtn.quantize_rtn, rtn.OPTIONS, needs_hessian=False),
    "gptq": Method(gptq.quantize_gptq, gptq.OPTIONS, needs_hessian=True, validate=gptq.validate),
    "slim-quant": Method(slim.quantize_slim_quant, slim.SLIM_QUANT_OPTIONS, needs_hessian=False),
    "slim": Method(slim.quantize_slim, slim.SLIM_OPTIONS, needs_hessian=True,
                   validate=slim.validate_slim, check_shape=sparsity.check_layer_shape),
    "wanda": Method(sparsity.prune_wanda, sparsity.OPTIONS, needs_hessian=True,
                    validate=sparsity.validate, check_shape=sparsity.check_layer_shape),
    "sparsegpt": Method(sparsity.prune_sparsegpt, sparsity.SPARSEGPT_OPTIONS, needs_hessian=True,
                        validate=sparsity.validate_sparsegpt,
                        check_shape=sparsity.check_layer_shape),
    "magnitude": Method(sparsity.prune_magnitude, sparsity.OPTIONS, needs_hessian=False,
                        validate=sparsity.validate, check_shape=sparsity.check_layer_shape),
    "claq": Method(claq.quantize_claq, claq.OPTIONS, needs_hessian=True, validate=claq.validate),
    "quantease": Method(quantease.quantize_quantease, quantease.OPTIONS, needs_hessian=True,
                        validate=quantease.validate),
    "spqr": Method(spqr.quantize_spqr, spqr.OPTIONS, needs_hessian=True, validate=spqr.validate,
                   check_shape=spqr.check_shape),
    "squeezellm": Method(squeezellm.quantize_squeezellm, squeezellm.OPTIONS, needs_hessian=True),
    "aqlm": Method(aqlm.quantize_aqlm, aqlm.OPTIONS, needs_hessian=True,
                   check_shape=aqlm.check_shape),
}
