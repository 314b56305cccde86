"""Quantization methods: one file per method, registered in METHODS.

A method is a function fn(W, H, opts, name) -> QuantizedWeight with
  W     (out, in) float64, already validated (finite)
  H     (in, in) float64 mean x xᵀ, or None when the method does not need it
  opts  dict of every option of the method (defaults filled in, validated)
  name  tensor name for messages ("" if not given)
Adding a method = one line below (its defaults dict lists its options).
"""

from dataclasses import dataclass
from typing import Callable

from refq.methods import gptq, rtn


@dataclass(frozen=True)
class Method:
    fn: Callable            # fn(W, H, opts, name) -> QuantizedWeight
    defaults: dict          # option name -> default; any other option is an error
    needs_hessian: bool


METHODS = {
    "rtn": Method(rtn.quantize_rtn, rtn.DEFAULTS, needs_hessian=False),
    "gptq": Method(gptq.quantize_gptq, gptq.DEFAULTS, needs_hessian=True),
}
