"""AQLM block fine-tuning: the second half of AQLM (arXiv 2401.06118, §3.3, "fine-tuning").

After every linear of decoder layer l has been quantized (codes, codebooks,
scales), the layer's continuous parameters θ = (the codebooks and scales of its
additive linears, its two RMSNorm weights, its q/k/v biases if any) are tuned,
the codes fixed, so that the quantized layer reproduces the unquantized one on
the calibration inputs:

    min_θ  MSE(θ) = mean over windows w and entries of (layer_θ(x_w) − layer_fp(x_w))²

x_w is the input of layer l on window w in the (already quantized) model, i.e.
what the quantized layer will really see; layer_fp(x_w) is the unquantized
layer's output on it (computed before the layer is quantized).  The fine-tuned
layer then produces the inputs of layer l+1.

Optimizer (the official code's, Vahe1994/AQLM main.py / finetune_groupwise):
Adam with lr 1e-5, betas (0.9, 0.95), eps 1e-8, batches of `batch_size`
windows (argparse default 1) in a seeded random order per epoch, gradients of
the batch's mean MSE (llama_np.backward.block_mse_and_grads, carried from Ŵ to
the codebooks and scales by additive_grads).  After each epoch:
  * MSE is measured on all calibration windows with the parameters AS STORED:
    codebooks and scales rounded to float16 (norms and biases stay float32);
  * keep best (--finetune_keep_best): the best stored parameters so far are
    kept, epoch 0 (the unfine-tuned layer) included, so the result never has a
    larger calibration MSE than the layer had; an epoch that did not improve
    puts θ back to the best (as the official code);
  * early stop (finetune_relative_mse_tolerance, README 1e-3): stop when an
    epoch's MSE > (1 − tolerance) × the best MSE before it; or after `epochs`
    (official 1000).
The float32 θ of the best epoch is also evaluated unrounded, so the history
says what the float16 rounding costs (mse_float32 vs mse_after).

The stored format does not change (same tensors, same dtypes): bits per
weight are those of AQLM without fine-tuning.
"""
import math
import time

import numpy as np

from llama_np.backward import additive_grads, block_mse_and_grads, layer_forward, layer_params
from refq.errors import RefqError

DEFAULTS = dict(epochs=1000, lr=1e-5, beta1=0.9, beta2=0.95, eps=1e-8, batch_size=1,
                relative_tolerance=1e-3, seed=0)
FP16_MAX = 65504.0


def fp16_round(x):
    """What the additive format stores: float16 (as float32), clipped to its range."""
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)


def _additive_names(layer):
    return [n for n, lin in layer.linears.items() if getattr(lin, "FORMAT", None) == "additive"]


def _theta(layer):
    """The trainable parameters of a layer, float32 copies: {key: array}."""
    th = {"input_layernorm.weight": layer.input_norm, "post_attention_layernorm.weight": layer.post_norm}
    for n, b in layer.biases.items():
        th[n + ".bias"] = b
    for n in _additive_names(layer):
        th[n + ".codebooks"] = layer.linears[n].codebooks
        th[n + ".scales"] = layer.linears[n].scales
    return {k: np.array(v, dtype=np.float32) for k, v in th.items()}


def _rounded(th):
    """θ as stored: codebooks and scales in float16."""
    return {k: fp16_round(v) if k.endswith((".codebooks", ".scales")) else v for k, v in th.items()}


def _dense(C, s, codes):
    """Ŵ = s_i Σ_m C_m[b_ikm] (out, in) float32, as AdditiveWeight.dequantize."""
    out, K, M = codes.shape
    Z = C[0][codes[:, :, 0]]
    for m in range(1, M):
        Z = Z + C[m][codes[:, :, m]]
    return s[:, None] * Z.reshape(out, -1)


class _Block:
    """A decoder layer with θ made explicit: P(θ) for layer_forward, and dθ from dP."""

    def __init__(self, layer):
        self.cfg = layer.cfg
        self.fixed = layer_params(layer)                             # other linears: dense Ŵ
        self.codes = {n: layer.linears[n].codes.astype(np.int64) for n in _additive_names(layer)}

    def params(self, th):
        P = dict(self.fixed)
        for k, v in th.items():
            if not k.endswith((".codebooks", ".scales")):
                P[k] = v
        for n, codes in self.codes.items():
            P[n + ".weight"] = _dense(th[n + ".codebooks"], th[n + ".scales"], codes)
        return P

    def theta_grads(self, th, grads):
        g = {k: grads[k] for k in th if not k.endswith((".codebooks", ".scales"))}
        for n, codes in self.codes.items():
            g[n + ".codebooks"], g[n + ".scales"] = additive_grads(
                codes, th[n + ".codebooks"], th[n + ".scales"], grads[n + ".weight"])
        return g

    def mse(self, th, xs, targets, pos):
        P = self.params(th)
        return float(np.mean([np.mean((layer_forward(P, self.cfg, x, pos)[0] - t).astype(np.float64) ** 2)
                              for x, t in zip(xs, targets)]))


def finetune_layer(layer, xs, targets, pos, opts=None):
    """Fine-tune `layer` in place (see the module docstring).

    xs, targets: lists of (T, d) float32, the layer's inputs and the unquantized
    layer's outputs on them; pos (T,).  opts: DEFAULTS overridden.
    -> info {"mse_history": [epoch 0 (before), 1, ...] (stored parameters),
             "mse_before", "mse_after", "mse_float32", "epochs", "seconds"}.
    """
    o = dict(DEFAULTS, **(opts or {}))
    tick = time.perf_counter()
    block = _Block(layer)
    th = _theta(layer)
    best_th = {k: v.copy() for k, v in th.items()}
    best = block.mse(_rounded(th), xs, targets, pos)
    history = [best]
    m = {k: np.zeros_like(v) for k, v in th.items()}                 # Adam moments
    v = {k: np.zeros_like(x) for k, x in th.items()}
    b1, b2, lr, eps = o["beta1"], o["beta2"], o["lr"], o["eps"]
    rng = np.random.default_rng(o["seed"])
    n, bs, t = len(xs), o["batch_size"], 0
    epochs = 0
    for epochs in range(1, o["epochs"] + 1):
        order = rng.permutation(n)
        for b0 in range(0, n, bs):
            batch = order[b0:b0 + bs]
            P = block.params(th)
            gsum = None
            for j in batch:                                          # mean of the batch's gradients
                _, _, gP = block_mse_and_grads(P, block.cfg, xs[j], pos, targets[j])
                gsum = gP if gsum is None else {k: gsum[k] + gP[k] for k in gsum}
            g = block.theta_grads(th, {k: x / len(batch) for k, x in gsum.items()})
            t += 1
            for k in th:                                             # Adam (Kingma & Ba, alg. 1)
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k]
                mhat = m[k] / (1 - b1 ** t)
                vhat = v[k] / (1 - b2 ** t)
                th[k] = (th[k] - lr * mhat / (np.sqrt(vhat) + eps)).astype(np.float32)
        loss = block.mse(_rounded(th), xs, targets, pos)
        history.append(loss)
        prev_best = best
        if loss < best:
            best, best_th = loss, {k: x.copy() for k, x in th.items()}
        else:                                                        # keep best: back to it
            th = {k: x.copy() for k, x in best_th.items()}
        if not loss <= (1 - o["relative_tolerance"]) * prev_best:   # early stop (or diverged: NaN)
            break
    mse_f32 = block.mse(best_th, xs, targets, pos)
    stored = _rounded(best_th)                                       # write back, as stored
    layer.input_norm = stored["input_layernorm.weight"]
    layer.post_norm = stored["post_attention_layernorm.weight"]
    for nm in layer.biases:
        layer.biases[nm] = stored[nm + ".bias"]
    for nm in block.codes:
        q = layer.linears[nm]
        q.codebooks = stored[nm + ".codebooks"].astype(np.float16)
        q.scales = stored[nm + ".scales"].astype(np.float16)
        q._dense = None                                              # cached dequantization
        q._validate()
    return {"mse_history": history, "mse_before": history[0], "mse_after": best,
            "mse_float32": mse_f32, "epochs": epochs, "seconds": time.perf_counter() - tick}


# ---------------------------------------------------------------------------
# refq quantize: flags, checks, the per-layer hook
# ---------------------------------------------------------------------------
FLAGS = {  # flag -> (DEFAULTS key, type, help)
    "--finetune-epochs": ("epochs", int, "max epochs per layer (official 1000; early stop)"),
    "--finetune-lr": ("lr", float, "Adam learning rate (official 1e-5)"),
    "--finetune-batch-size": ("batch_size", int, "windows per Adam step (official 1)"),
    "--finetune-tolerance": ("relative_tolerance", float,
                             "stop when an epoch improves the MSE by less (official README 1e-3)"),
}


def add_flags(parser):
    g = parser.add_argument_group("AQLM block fine-tuning (--method aqlm only)")
    g.add_argument("--finetune", action="store_true",
                   help="after each layer is quantized, tune its codebooks, scales and norms "
                        "(codes fixed) to match the unquantized layer's outputs")
    for flag, (key, typ, helptext) in FLAGS.items():
        g.add_argument(flag, dest="finetune_" + key, type=typ, default=None,
                       help=f"{helptext}; default {DEFAULTS[key]}")


def options_from_args(args, method):
    """The fine-tuning options of a `refq quantize` run, checked; None without --finetune."""
    given = {key: getattr(args, "finetune_" + key) for _, (key, _, _) in FLAGS.items()
             if getattr(args, "finetune_" + key, None) is not None}
    if not args.finetune:
        if given:
            flag = next(f for f, (k, _, _) in FLAGS.items() if k in given)
            raise RefqError(f"{flag}: needs --finetune")
        return None
    if method != "aqlm":
        raise RefqError(f"--finetune: only for --method aqlm (the additive format), not {method}")
    o = dict(DEFAULTS, seed=args.seed, **given)
    for flag, (key, _, _) in FLAGS.items():
        v = o[key]
        ok, need = {"epochs": (v >= 1, "an integer >= 1"), "batch_size": (v >= 1, "an integer >= 1"),
                    "lr": (math.isfinite(v) and v > 0, "a number > 0"),
                    "relative_tolerance": (math.isfinite(v) and v >= 0, "a number >= 0")}[key]
        if not ok:
            raise RefqError(f"{flag} {v}: must be {need}")
    return o


def make_layer_hook(opts, record, log=None):
    """A hook for refq.calibrate.quantize_layers: called with (i, layer, hs, pos) before
    layer i is quantized, it runs the unquantized layer on hs (the targets) and returns
    the function that fine-tunes the quantized layer on (hs, targets) afterwards.
    Each layer's info is appended to record (a list)."""
    def hook(i, layer, hs, pos):
        targets = [layer.forward(h, pos) for h in hs]

        def after():
            info = finetune_layer(layer, hs, targets, pos, opts)
            record.append(dict(layer=i, **info))
            if log is not None:
                log(f"finetune layer {i}: mse {info['mse_before']:.4g} -> {info['mse_after']:.4g} "
                    f"(float32 {info['mse_float32']:.4g}), {info['epochs']} epochs, "
                    f"{info['seconds']:.1f} s")
        return after
    return hook
