"""Block fine-tuning: the gradient halves of AQLM and SLiM, one Adam loop for both.

After every linear of decoder layer l has been quantized, some continuous
parameters θ of the layer are tuned, the rest (codes, masks, quantized base
weights) fixed, so that the quantized layer reproduces the unquantized one on
the calibration inputs:

    min_θ  MSE(θ) = mean over windows w and entries of (layer_θ(x_w) − layer_fp(x_w))²

x_w is the input of layer l on window w in the (already quantized) model, i.e.
what the quantized layer will really see; layer_fp(x_w) is the unquantized
layer's output on it (computed before the layer is quantized).  The fine-tuned
layer then produces the inputs of layer l+1.  What θ is, per method (a "block"
class below says how θ makes the layer's weights and how it is stored):

  AQLM (arXiv 2401.06118 §3.3), AqlmBlock: the codebooks and scales of its
      additive linears, Ŵ_i = s_i Σ_m C_m[b_im], its two RMSNorm weights and
      its q/k/v biases.  Stored: codebooks and scales float16.
  SLiM (arXiv 2410.09615, the optional adapter fine-tuning), SlimBlock: the
      low-rank adapters L, R of its slim linears, Ŵ = W_c + L R, the sparse
      quantized base W_c frozen (as the paper).  Stored as SLiM stores them:
      float16, or quantized to adapter_bits (refq.methods.slim.quantize_rows,
      the scales recomputed from the tuned values).
      The paper's (and the official code's, slim/fine_tune.py) objective is the
      end-to-end language-model loss on C4 (HF Trainer, AdamW lr 5e-5, one
      epoch of up to 30000 sequences, global batch 64), i.e. tens of millions of
      tokens through a whole-model backward: days on refq's 2 CPU cores, and on
      refq's small calibration set (nsamples x seqlen tokens) ~0.5 M adapter
      parameters per SmolLM2 layer would be fitted to a few thousand tokens of
      next-token targets.  refq uses the block-output MSE above instead (the
      same distillation target as AQLM, per layer, 576 targets per token), with
      the official optimizer settings (lr 5e-5, betas 0.9/0.999, eps 1e-8,
      no weight decay).

The loop (train_block, shared): Adam with batches of `batch_size` windows in a
seeded random order per epoch, gradients of the batch's mean MSE
(llama_np.backward.block_mse_and_grads, carried from Ŵ to θ by the block).
After each epoch:
  * MSE is measured on all calibration windows with θ AS STORED (rounded);
  * keep best: the best stored θ so far is kept, epoch 0 (the layer as it
    was) included, so the result never has a larger calibration MSE than the
    layer had; an epoch that did not improve puts θ back to the best (as the
    official AQLM code); when no epoch beats epoch 0 the layer is left as is;
  * early stop: stop when an epoch's MSE > (1 − tolerance) × the best MSE
    before it; or after `epochs`.
  * divergence: a non-finite gradient or parameter, a parameter beyond what
    its stored type can hold (float16: 65504), or an epoch's MSE non-finite or
    over DIVERGED (100) x the layer's MSE before fine-tuning, stops the loop
    with one warning naming the layer and the learning rate; the best θ before
    it is what is stored (nothing non-finite, nothing clipped).
The float32 θ of the best epoch is also evaluated unrounded, so the history
says what the rounding to the stored precision costs (mse_float32 vs
mse_after).

The stored format does not change (same tensors, same dtypes and shapes): bits
per weight are those of the method without fine-tuning.
"""
import math
import time
import warnings

import numpy as np

from llama_np.backward import (additive_grads, block_mse_and_grads, layer_forward, layer_params,
                               lowrank_grads)
from refq.errors import RefqError

# AQLM: the official code's (Vahe1994/AQLM main.py argparse + README)
DEFAULTS = dict(epochs=1000, lr=1e-5, beta1=0.9, beta2=0.95, eps=1e-8, batch_size=1,
                relative_tolerance=1e-3, seed=0)
# SLiM: the official fine_tune's optimizer (HF TrainingArguments defaults: AdamW lr 5e-5,
# betas (0.9, 0.999), eps 1e-8, weight decay 0 = Adam); batch, epochs, early stop: AQLM's
SLIM_DEFAULTS = dict(DEFAULTS, lr=5e-5, beta2=0.999)
FP16_MAX = 65504.0
DIVERGED = 100.0         # an epoch whose MSE exceeds DIVERGED x the layer's before: diverged


def fp16_round(x):
    """What the additive format stores: float16 (as float32), clipped to its range."""
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)


class Adam:
    """Adam (Kingma & Ba 2015, algorithm 1) on a dict of float32 arrays θ:

        m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²
        θ ← θ − lr m̂ / (√v̂ + ε),   m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
    """

    def __init__(self, theta, lr, beta1, beta2, eps):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, beta1, beta2, eps, 0
        self.m = {k: np.zeros_like(x) for k, x in theta.items()}
        self.v = {k: np.zeros_like(x) for k, x in theta.items()}

    def step(self, theta, g):
        """-> the new θ (a new dict; θ itself is not changed)."""
        self.t += 1
        b1, b2, new = self.b1, self.b2, {}
        for k, x in theta.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * g[k] * g[k]
            mhat = self.m[k] / (1 - b1 ** self.t)
            vhat = self.v[k] / (1 - b2 ** self.t)
            new[k] = (x - self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(np.float32)
        return new


def _bad(arrays, limit_of, what):
    """Text naming the first array holding a non-finite value or one beyond limit_of(key)
    (e.g. "non-finite gradient of mlp.up_proj.lora_L"), or None."""
    for k, x in arrays.items():
        if not np.all(np.isfinite(x)):
            return f"non-finite {what} of {k}"
        lim = limit_of(k)
        if lim is not None and np.max(np.abs(x), initial=0.0) > lim:
            return f"{what} of {k} beyond {lim:g} (its stored type's range)"
    return None


def train_block(block, xs, targets, pos, o, name="layer"):
    """The fine-tuning loop shared by every method (module docstring).

    block: an AqlmBlock / SlimBlock; xs, targets: lists of (T, d) float32; pos (T,);
    o: options (DEFAULTS keys).  Writes the best stored θ into the layer (only if it
    beats epoch 0).  -> info {"mse_history": [epoch 0 (before), 1, ...] (stored θ),
    "mse_before", "mse_after", "mse_float32", "epochs", "seconds"} (+ "diverged": text).
    """
    tick = time.perf_counter()
    th = block.theta()
    best_th, best_epoch = {k: v.copy() for k, v in th.items()}, 0
    best = block.mse(block.stored(th), xs, targets, pos)
    history = [best]
    adam = Adam(th, o["lr"], o["beta1"], o["beta2"], o["eps"])
    rng = np.random.default_rng(o["seed"])
    n, bs = len(xs), o["batch_size"]
    epochs, diverged = 0, None
    with np.errstate(over="ignore", invalid="ignore"):     # divergence is detected, not warned
        for epochs in range(1, o["epochs"] + 1):
            order = rng.permutation(n)
            for step, b0 in enumerate(range(0, n, bs), 1):
                batch = order[b0:b0 + bs]
                P = block.params(th)
                gsum = None
                for j in batch:                              # mean of the batch's gradients
                    _, _, gP = block_mse_and_grads(P, block.cfg, xs[j], pos, targets[j])
                    gsum = gP if gsum is None else {k: gsum[k] + gP[k] for k in gsum}
                g = block.theta_grads(th, {k: x / len(batch) for k, x in gsum.items()})
                new = adam.step(th, g)
                bad = _bad(g, lambda k: None, "gradient") or _bad(new, block.limit, "parameter")
                if bad:
                    diverged = f"epoch {epochs}, step {step}: {bad}"
                    break
                th = new
            if diverged is None:
                loss = block.mse(block.stored(th), xs, targets, pos)
                history.append(loss)
                if not loss <= DIVERGED * history[0]:               # NaN included
                    diverged = f"epoch {epochs}: MSE {loss:.4g} > {DIVERGED:g} x {history[0]:.4g} before"
            if diverged is not None:
                warnings.warn(f"{name}: fine-tuning diverged at lr {o['lr']:g} ({diverged}); "
                              f"kept epoch {best_epoch} (mse {best:.4g})")
                break
            prev_best = best
            if loss < best:
                best, best_epoch, best_th = loss, epochs, {k: x.copy() for k, x in th.items()}
            else:                                            # keep best: back to it
                th = {k: x.copy() for k, x in best_th.items()}
            if not loss <= (1 - o["relative_tolerance"]) * prev_best:     # early stop
                break
    mse_f32 = block.mse(best_th, xs, targets, pos)
    if best_epoch > 0:                                       # write back, as stored
        block.write_back(block.stored(best_th))
    info = {"mse_history": history, "mse_before": history[0], "mse_after": best,
            "mse_float32": mse_f32, "epochs": epochs, "seconds": time.perf_counter() - tick}
    if diverged is not None:
        info["diverged"] = diverged
    return info


# ---------------------------------------------------------------------------
# the blocks: what θ is, for each method
# ---------------------------------------------------------------------------
class _Block:
    """A decoder layer with θ made explicit.  Subclasses define `_theta0` (θ's
    float32 starting values), `_weights(th)` (the dense Ŵ of the linears θ
    parametrises), `_weight_grads` (dŴ -> dθ), `stored` and `write_back`."""

    def __init__(self, layer):
        self.layer = layer
        self.cfg = layer.cfg
        self.fixed = layer_params(layer)                     # every parameter, Ŵ dequantized

    def theta(self):
        return {k: np.array(v, dtype=np.float32) for k, v in self._theta0().items()}

    def params(self, th):
        """The layer's parameters P (layer_forward's) with θ in place."""
        P = dict(self.fixed)
        P.update({k: v for k, v in th.items() if k in P})    # norms, biases
        P.update(self._weights(th))
        return P

    def theta_grads(self, th, grads):
        g = {k: grads[k] for k in th if k in self.fixed}
        g.update(self._weight_grads(th, grads))
        return g

    def limit(self, key):
        """Largest |value| the stored type of θ[key] holds (None: float32, no limit)."""
        return None

    def mse(self, th, xs, targets, pos):
        P = self.params(th)
        return float(np.mean([np.mean((layer_forward(P, self.cfg, x, pos)[0] - t).astype(np.float64) ** 2)
                              for x, t in zip(xs, targets)]))


def _named(layer, fmt):
    return [n for n, lin in layer.linears.items() if getattr(lin, "FORMAT", None) == fmt]


def _dense(C, s, codes):
    """Ŵ = s_i Σ_m C_m[b_ikm] (out, in) float32, as AdditiveWeight.dequantize."""
    out, K, M = codes.shape
    Z = C[0][codes[:, :, 0]]
    for m in range(1, M):
        Z = Z + C[m][codes[:, :, m]]
    return s[:, None] * Z.reshape(out, -1)


class AqlmBlock(_Block):
    """θ: codebooks and scales of the additive linears, norms, q/k/v biases."""
    DEFAULTS = DEFAULTS
    FP16 = (".codebooks", ".scales")

    def __init__(self, layer):
        super().__init__(layer)
        self.codes = {n: layer.linears[n].codes.astype(np.int64) for n in _named(layer, "additive")}

    def _theta0(self):
        L = self.layer
        th = {"input_layernorm.weight": L.input_norm, "post_attention_layernorm.weight": L.post_norm}
        th.update({n + ".bias": b for n, b in L.biases.items()})
        for n in self.codes:
            th[n + ".codebooks"], th[n + ".scales"] = L.linears[n].codebooks, L.linears[n].scales
        return th

    def _weights(self, th):
        return {n + ".weight": _dense(th[n + ".codebooks"], th[n + ".scales"], c)
                for n, c in self.codes.items()}

    def _weight_grads(self, th, grads):
        g = {}
        for n, codes in self.codes.items():
            g[n + ".codebooks"], g[n + ".scales"] = additive_grads(
                codes, th[n + ".codebooks"], th[n + ".scales"], grads[n + ".weight"])
        return g

    def limit(self, key):
        return FP16_MAX if key.endswith(self.FP16) else None

    def stored(self, th):
        """θ as stored: codebooks and scales in float16."""
        return {k: fp16_round(v) if k.endswith(self.FP16) else v for k, v in th.items()}

    def write_back(self, st):
        L = self.layer
        L.input_norm = st["input_layernorm.weight"]
        L.post_norm = st["post_attention_layernorm.weight"]
        for nm in L.biases:
            L.biases[nm] = st[nm + ".bias"]
        for nm in self.codes:
            q = L.linears[nm]
            q.codebooks = st[nm + ".codebooks"].astype(np.float16)
            q.scales = st[nm + ".scales"].astype(np.float16)
            q._dense = None                                  # cached dequantization
            q._validate()


class SlimBlock(_Block):
    """θ: the adapters L (out, r), R (r, in) of the slim linears; W_c frozen."""
    DEFAULTS = SLIM_DEFAULTS

    def __init__(self, layer):
        super().__init__(layer)
        self.names = [n for n in _named(layer, "slim") if layer.linears[n].rank]
        self.base = {n: layer.linears[n].base() for n in self.names}     # W_c float32

    def _theta0(self):
        th = {}
        for n in self.names:
            th[n + ".lora_L"], th[n + ".lora_R"] = self.layer.linears[n].adapters()
        return th

    def _weights(self, th):
        return {n + ".weight": self.base[n] + th[n + ".lora_L"] @ th[n + ".lora_R"]
                for n in self.names}                         # Ŵ = W_c + L R

    def _weight_grads(self, th, grads):
        g = {}
        for n in self.names:
            g[n + ".lora_L"], g[n + ".lora_R"] = lowrank_grads(
                th[n + ".lora_L"], th[n + ".lora_R"], grads[n + ".weight"])
        return g

    def _quant(self, key):
        """(bits, group size) of the stored adapter θ[key], or None for float16."""
        q = self.layer.linears[key.rsplit(".", 1)[0]]
        return None if q.adapter_bits is None else (q.adapter_bits, q.adapter_group_size)

    def limit(self, key):
        """float16 values, or float16 scales of codes up to 2^(a-1): |A| <= 65504 (2^(a-1) - 1)."""
        qa = self._quant(key)
        return FP16_MAX if qa is None else FP16_MAX * (2 ** (qa[0] - 1) - 1)

    def stored(self, th):
        """The adapters as SLiM stores them: float16, or re-quantized to adapter_bits."""
        from refq.methods.slim import quantize_rows
        out = {}
        for k, v in th.items():
            qa = self._quant(k)
            out[k] = fp16_round(v) if qa is None else \
                quantize_rows(v.astype(np.float64), *qa)[2].astype(np.float32)
        return out

    def write_back(self, st):
        from refq.formats.packing import pack
        from refq.methods.slim import quantize_rows
        for n in self.names:
            q = self.layer.linears[n]
            for x in ("L", "R"):
                v = st[f"{n}.lora_{x}"]
                if q.adapter_bits is None:
                    q.fields[f"lora_{x}"] = v.astype(np.float16)
                else:                                        # same grid as stored(): exact
                    codes, scales, _ = quantize_rows(v.astype(np.float64), q.adapter_bits,
                                                     q.adapter_group_size)
                    q.fields[f"lora_{x}_q"] = pack(codes, q.adapter_bits)
                    q.fields[f"lora_{x}_scales"] = scales.astype(np.float16)
            q._lr = None                                     # cached adapters
            q._validate()


BLOCKS = {"aqlm": AqlmBlock, "slim": SlimBlock}             # --method -> its block


def block_for(layer):
    """The block class of a quantized layer, from the formats of its linears."""
    fmts = {getattr(lin, "FORMAT", None) for lin in layer.linears.values()}
    if "additive" in fmts:
        return AqlmBlock
    if "slim" in fmts:
        return SlimBlock
    raise RefqError(f"fine-tuning: no fine-tunable linears (formats {sorted(map(str, fmts))}); "
                    f"only additive (aqlm) and slim")


def finetune_layer(layer, xs, targets, pos, opts=None, name="layer"):
    """Fine-tune `layer` in place (see the module docstring): AQLM's codebooks/scales/norms
    or SLiM's adapters, from the formats of its linears.

    xs, targets: lists of (T, d) float32, the layer's inputs and the unquantized
    layer's outputs on them; pos (T,).  opts: the block's DEFAULTS overridden.
    -> train_block's info.
    """
    cls = block_for(layer)
    return train_block(cls(layer), xs, targets, pos, dict(cls.DEFAULTS, **(opts or {})), name)


# ---------------------------------------------------------------------------
# refq quantize: flags, checks, the per-layer hook
# ---------------------------------------------------------------------------
FLAGS = {  # flag -> (DEFAULTS key, type, help)
    "--finetune-epochs": ("epochs", int, "max epochs per layer (early stop)"),
    "--finetune-lr": ("lr", float, "Adam learning rate"),
    "--finetune-batch-size": ("batch_size", int, "windows per Adam step"),
    "--finetune-tolerance": ("relative_tolerance", float,
                             "stop when an epoch improves the MSE by less"),
}


def add_flags(parser):
    g = parser.add_argument_group("block fine-tuning (--method aqlm or slim)")
    g.add_argument("--finetune", action="store_true",
                   help="after each layer is quantized, tune its continuous parameters to match "
                        "the unquantized layer's outputs: aqlm its codebooks, scales and norms "
                        "(codes fixed), slim its low-rank adapters (sparse quantized base fixed)")
    for flag, (key, typ, helptext) in FLAGS.items():
        g.add_argument(flag, dest="finetune_" + key, type=typ, default=None,
                       help=f"{helptext}; default aqlm {DEFAULTS[key]:g} (official), "
                            f"slim {SLIM_DEFAULTS[key]:g}")


def options_from_args(args, method):
    """The fine-tuning options of a `refq quantize` run, checked; None without --finetune."""
    given = {key: getattr(args, "finetune_" + key) for _, (key, _, _) in FLAGS.items()
             if getattr(args, "finetune_" + key, None) is not None}
    if not args.finetune:
        if given:
            flag = next(f for f, (k, _, _) in FLAGS.items() if k in given)
            raise RefqError(f"{flag}: needs --finetune")
        return None
    if method not in BLOCKS:
        raise RefqError(f"--finetune: only for --method {' or '.join(BLOCKS)} (their additive and "
                        f"slim formats), not {method}")
    o = dict(BLOCKS[method].DEFAULTS, seed=args.seed, **given)
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
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info = finetune_layer(layer, hs, targets, pos, opts, name=f"model.layers.{i}")
            for w in caught:                                 # e.g. "diverged at lr ..."
                if log is not None:
                    log(f"warning: {w.message}")
                else:
                    warnings.warn(w.message)
            record.append(dict(layer=i, **info))
            if log is not None:
                log(f"finetune layer {i}: mse {info['mse_before']:.4g} -> {info['mse_after']:.4g} "
                    f"(float32 {info['mse_float32']:.4g}), {info['epochs']} epochs, "
                    f"{info['seconds']:.1f} s")
        return after
    return hook
