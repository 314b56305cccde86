"""The Fisher-information sensitivity of SqueezeLLM (arXiv 2306.07629, §3.1).

SqueezeLLM weights the k-means of each weight row by the diagonal of the Fisher
information of the model's loss, approximated on calibration data by squared
gradients:

    F_rc = Σ_{w ∈ calibration windows} (∂L_w / ∂W_rc)²              (paper eq. 3-4)

with L_w the mean next-token NLL of window w (llama_np.loss_and_grads).  The
scale of F does not matter (it weights a k-means), so the sum is not divided
by the number of windows.

It is computed ONCE, on the unquantized model, before any layer is quantized
(as the paper: the gradients come from the original model).  Streamed: each
window's gradients are squared and added as the backward pass hands them over
(loss_and_grads(on_grad=...)), so memory stays at the model, one window's
activations, one layer's gradients, and the accumulated F itself (float32, the
size of the linear weights).

    with fisher_context(model, windows, opts, log) as info:     # refq quantize
        quantize_layers(...)          # squeezellm --sensitivity fisher reads F
    info -> {"fisher_seconds": ..., "fisher_windows": ...} (empty when not used)

The squeezellm method finds F through fisher_sensitivity(W, H, name), which
looks the tensor name up in the F that fisher_context made current.
"""
import contextlib
import time

import numpy as np

from refq.errors import RefqError

_CURRENT = None          # {full linear name, e.g. "model.layers.3.mlp.up_proj": F (out, in)}


def compute_fisher(model, windows, progress=None):
    """F for every linear of every decoder layer.  windows (n, T) token ids.

    progress(i) is called after each window.  -> {full linear name: (out, in) float32}.
    """
    from llama_np import loss_and_grads
    from llama_np.model import Linear

    wanted = {f"model.layers.{i}.{n}.weight": f"model.layers.{i}.{n}"
              for i, layer in enumerate(model.layers)
              for n, lin in layer.linears.items() if isinstance(lin, Linear)}
    F = {}

    def add(name, g):                      # called as soon as a gradient is complete
        key = wanted.get(name)
        if key is None:
            return
        if key in F:
            F[key] += g * g
        else:
            F[key] = g * g                 # (out, in) float32
    for i, w in enumerate(windows):
        loss_and_grads(model, w, on_grad=add)
        if progress is not None:
            progress(i)
    return F


@contextlib.contextmanager
def use_fisher(F):
    """Make F the Fisher that fisher_sensitivity reads, for the `with` block."""
    global _CURRENT
    old, _CURRENT = _CURRENT, F
    try:
        yield F
    finally:
        _CURRENT = old


def current_fisher(name):
    """F of tensor `name` in the Fisher made current by use_fisher, or None (refq.cluster
    sends it with the linear's task: a worker has no current Fisher of its own)."""
    return None if _CURRENT is None else _CURRENT.get(name)


@contextlib.contextmanager
def fisher_context(model, windows, opts, log=None):
    """Compute F on `model` (before quantization) when opts ask for it; else nothing.

    opts: the method's validated options ("sensitivity" == "fisher" turns it on).
    Yields a dict for the run's record: fisher_seconds, fisher_windows (or {}).
    """
    if opts.get("sensitivity") != "fisher":
        yield {}
        return
    tick = time.perf_counter()
    n = len(windows)
    step = max(1, n // 8)
    F = compute_fisher(model, windows, None if log is None else
                       lambda i: (i + 1) % step == 0 and log(f"fisher: window {i + 1}/{n}"))
    info = {"fisher_seconds": round(time.perf_counter() - tick, 3), "fisher_windows": len(windows)}
    if log is not None:
        log(f"fisher: {len(windows)} windows in {info['fisher_seconds']:.1f} s")
    with use_fisher(F):
        yield info


def fisher_sensitivity(W, H, name):
    """SqueezeLLM's sensitivity "fisher": F of the tensor `name` -> (out, in) float64."""
    if _CURRENT is None:
        raise RefqError(f"{name or 'squeezellm'}: sensitivity 'fisher' needs the Fisher "
                        "information of the model: refq quantize computes it; from Python, "
                        "wrap the calls in refq.fisher.use_fisher(compute_fisher(model, windows))")
    F = _CURRENT.get(name)
    if F is None:
        raise RefqError(f"{name or 'squeezellm'}: no Fisher information for this tensor "
                        f"(have {len(_CURRENT)} tensors, e.g. {next(iter(_CURRENT), None)!r})")
    if F.shape != W.shape:
        raise RefqError(f"{name}: Fisher information has shape {F.shape}, the weight {W.shape}")
    return np.asarray(F, dtype=np.float64)
