"""Layer-sequential calibration: the loop every quantization method plugs into.

    windows = calibration_windows(ids, nsamples, seqlen, seed)   # (n, seqlen) token ids
    h = embed(windows)                                            # one (seqlen, d) per sample
    for each decoder layer l:
        run layer l on every sample, capturing the input x of each linear
            H = mean over all calibration tokens of x xᵀ           # (in, in) float64
        (q, k, v share one H; gate, up share one H)
        W_l  ->  quantize_weight(W, H, method, ...)                # replaces the linear
        h = layer_l^quantized(h)                                  # feeds layer l+1

Only one decoder layer's activations (for all samples) are held at a time.
With true_sequential, the four groups of linears of a layer are done in
order (q,k,v -> o -> gate,up -> down), each group's inputs re-captured after
the groups before it were quantized, so that each H sees the errors made so far.
"""
import time

import numpy as np
from scipy.linalg.blas import ssyrk

from llama_np.model import LINEAR_GROUPS
from refq.errors import RefqError


def calibration_windows(ids, nsamples=128, seqlen=512, seed=0):
    """nsamples windows of seqlen tokens at seeded random starts.  -> (nsamples, seqlen) int64."""
    ids = np.asarray(ids, dtype=np.int64)
    if nsamples < 1 or seqlen < 2:
        raise RefqError(f"--nsamples {nsamples} / --seqlen {seqlen}: need nsamples >= 1 "
                        "and seqlen >= 2")
    if len(ids) < nsamples * seqlen or len(ids) <= seqlen:
        raise RefqError(f"calibration text has {len(ids)} tokens, fewer than "
                        f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen + 1, size=nsamples)
    return np.stack([ids[s:s + seqlen] for s in starts])


class HessianAccumulator:
    """H = mean over tokens of x xᵀ, summed in float64.

    Each sample's Gram matrix xᵀx is formed in float32 by BLAS syrk (which
    computes one triangle: half the work of x.T @ x) and added to a float64 sum.
    """

    def __init__(self, n):
        self.sum = np.zeros((n, n), np.float64)     # (in, in), upper triangle filled
        self.tokens = 0

    def add(self, x):                               # x (T, in) float32
        x = np.asarray(x, dtype=np.float32)
        # x.T is Fortran-ordered, which BLAS takes without a copy: (xᵀ)(xᵀ)ᵀ = xᵀx
        g = ssyrk(1.0, x.T, trans=0, lower=0)       # upper triangle of xᵀx, (in, in)
        self.sum += g
        self.tokens += x.shape[0]

    def mean(self):
        u = np.triu(self.sum)
        H = u + np.triu(u, 1).T                     # symmetric from the upper triangle
        return H / max(self.tokens, 1)


class _Captured(Exception):
    """Raised by a capture hook to stop a forward pass once it has what it needs."""


def capture_hessians(layer, hs, pos, groups):
    """Run `layer` on every sample in hs, accumulating H for each group in `groups`.

    Returns {group (tuple of names): H (in, in) float64}. The forward pass is cut
    short after the last wanted group's input has been seen.
    """
    acc = {}
    last = max(LINEAR_GROUPS.index(g) for g in groups)

    def hook(names, x):
        if names in groups:
            acc.setdefault(names, HessianAccumulator(x.shape[-1])).add(x)
        if LINEAR_GROUPS.index(names) == last:
            raise _Captured

    for h in hs:
        try:
            layer.forward(h, pos, on_input=hook)
        except _Captured:
            pass
    return {g: a.mean() for g, a in acc.items()}


def quantize_layers(model, windows, quantize, true_sequential=False, log=None, layer_hook=None):
    """Quantize every linear of every decoder layer of `model`, in place.

    quantize(name, W, H) -> object with .matmul (the quantized weight); it is
    called with the full tensor name, e.g. "model.layers.3.mlp.up_proj".
    layer_hook(i, layer, hs, pos), called before layer i is quantized, may return
    a function called once it is (e.g. refq.finetune's block fine-tuning).
    Returns the list of what quantize returned, in order, as (name, result).
    """
    seqlen = windows.shape[1]
    pos = np.arange(seqlen)
    hs = [model.embed(w) for w in windows]                   # n x (seqlen, d)
    done = []
    for i, layer in enumerate(model.layers):
        t0 = time.perf_counter()
        after = layer_hook(i, layer, hs, pos) if layer_hook is not None else None
        plan = [[g] for g in LINEAR_GROUPS] if true_sequential else [list(LINEAR_GROUPS)]
        for groups in plan:
            Hs = capture_hessians(layer, hs, pos, groups)
            for g in groups:
                for name in g:
                    full = f"model.layers.{i}.{name}"
                    W = np.asarray(layer.linears[name].dequantize(), dtype=np.float32)
                    q = quantize(full, W, Hs[g])
                    layer.linears[name] = q
                    done.append((full, q))
        if after is not None:
            after()
        hs = [layer.forward(h, pos) for h in hs]             # the quantized layer's outputs
        if log is not None:
            log(i, time.perf_counter() - t0)
    return done
