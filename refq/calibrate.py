"""Layer-sequential calibration: the loop every quantization method plugs into.

    windows = calibration_windows(ids, nsamples, seqlen, seed)   # (n, seqlen) token ids
    X = embed(windows)                                            # (n, seqlen, d)
    for each decoder layer l:
        run layer l on every sample, capturing the input x of each linear
            H = mean over all calibration tokens of x xᵀ           # (in, in) float64
        (q, k, v share one H; gate, up share one H)
        W_l  ->  quantize_weight(W, H, method, ...)                # replaces the linear
        X = layer_l^quantized(X)                                  # feeds layer l+1

Only one decoder layer's activations (for all samples) are held at a time.
With true_sequential, the four groups of linears of a layer are done in
order (q,k,v -> o -> gate,up -> down), each group's inputs captured after the
groups before it were quantized, so that each H sees the errors made so far.

How the work is done (the numbers do not depend on any of it):

  * Stages.  A layer is computed in five stages, each ending at the input of
    a group of linears (or at the output):

        h ─RMSNorm─> a ─q,k,v + attention─> o ─o_proj + h─> h1 ─RMSNorm─> m
          [H_qkv ← a]                     [H_o ← o]           [H_gate,up ← m]
        m ─silu(gate)·up─> g ─down_proj + h1─> out
                           [H_down ← g]

    The default mode runs stages 0-3 with the original weights (capturing all
    four H), quantizes the seven linears, then runs the whole layer with the
    quantized ones.  True-sequential mode keeps what a stage produced (o, then
    h1) instead of recomputing it from h, so that each product is computed
    once (g is recomputed once, rather than held: it is the widest).
  * Batches.  The samples are cut into batches of `calib_batch` samples
    (default: BATCH_TOKENS tokens, 4 samples of 512); a batch's linears are
    one product over all its tokens, (batch*seqlen, in) x (in, out).
    Attention is per sample, in blocks of queries (llama_np causal_attention);
    the stages are llama_np.batched.layer_stages, shared with perplexity.
  * Hessians.  A batch's Gram matrix xᵀx is formed in float32 (BLAS syrk) as
    soon as x is computed, and added to a float64 sum in batch order.  So
    calib_batch changes H in its float32 rounding (a partial sum over other
    tokens); the thread count changes nothing.
  * Threads.  Batches run on `threads` worker threads, each with single-
    threaded BLAS; every product is computed on one batch's rows by one
    thread, and the sums are added in sample order, so that the results
    are the same bytes whatever the thread count (the BLAS and LAPACK of
    the quantizers also run single-threaded for the same reason: OpenBLAS's
    threaded Cholesky and small dgemm give other bits with 2 threads than 1).
"""
import time

import numpy as np
from scipy.linalg.blas import ssyrk

from llama_np.batched import layer_stages
from llama_np.model import LINEAR_GROUPS, rope_cos_sin
from llama_np.parallel import in_order, workers
from refq.errors import RefqError
from refq.resume import set_layer_params

QKV, O, GATE_UP, DOWN = LINEAR_GROUPS
BATCH_TOKENS = 2048         # default batch: this many tokens (whole samples, at least one)


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


def gram(x):
    """Upper triangle of xᵀx in float32 by BLAS syrk (half the work of x.T @ x).

    x (T, in) float32 -> (in, in) float32, the strict lower triangle 0.
    """
    x = np.asarray(x, dtype=np.float32)
    # x.T is Fortran-ordered, which BLAS takes without a copy: (xᵀ)(xᵀ)ᵀ = xᵀx
    return ssyrk(1.0, x.T, trans=0, lower=0)


class HessianAccumulator:
    """H = mean over tokens of x xᵀ, summed in float64.

    Each chunk's Gram matrix xᵀx is formed in float32 (gram()) and added to a
    float64 sum; the sum is the same bytes for the same chunks in the same order.
    """

    def __init__(self, n):
        self.sum = np.zeros((n, n), np.float64)     # (in, in), upper triangle filled
        self.tokens = 0

    def add(self, x):                               # x (T, in) float32
        self.add_gram(gram(x), x.shape[0])

    def add_gram(self, g, tokens):                  # g = gram(x) (in, in), x (tokens, in)
        self.sum += g
        self.tokens += tokens

    def mean(self, block=512):
        """H (in, in) float64, symmetric: the upper triangle of the sum mirrored,
        divided by the tokens.  Done in place in one copy, `block` rows at a
        time (no full-size temporaries: 11008² float64 is 0.9 GiB)."""
        H = self.sum.copy()
        n = H.shape[0]
        for i in range(0, n, block):
            e = min(i + block, n)
            H[i:e, :i] = H[:i, i:e].T               # left of the diagonal block: from above it
            d = H[i:e, i:e]
            d[...] = np.triu(d) + np.triu(d, 1).T   # the diagonal block itself
        H /= max(self.tokens, 1)
        return H


def default_batch(seqlen):
    """Samples per batch when not given: BATCH_TOKENS tokens, at least one sample."""
    return max(1, BATCH_TOKENS // seqlen)


# ============================================================================ one layer
# (the stages of a layer over a batch of samples: llama_np.batched.layer_stages)
class _Pass:
    """Runs layer_stages over all samples of X, batch by batch, on the worker threads."""

    def __init__(self, pool, n_workers, calib_batch, cos, sin, progress=None):
        self.pool, self.workers, self.batch = pool, n_workers, calib_batch
        self.cos, self.sin, self.progress = cos, sin, progress

    def __call__(self, layer, W, X, start="h", stop=None, O=None, want=(), write=True,
                 keep_o=False):
        """Stages start..stop of `layer` on every sample of X (n, T, d).

        Returns ({group: HessianAccumulator} for the groups in `want`, the attention
        outputs (n, T, nh*hd) if keep_o). With write, X[batch] is replaced by
        what the stages return (h1 or the layer's output).
        """
        n, T, _ = X.shape
        acc = {}
        O_out = None
        if keep_o:
            nh, hd = layer.cfg.num_attention_heads, layer.cfg.head_dim
            O_out = np.empty((n, T, nh * hd), np.float32)

        def work(s):
            e = min(s + self.batch, n)
            grams = {}

            def capture(group, x):                          # x (e-s, T, in)
                if group in want:
                    grams[group] = gram(x.reshape(-1, x.shape[-1]))

            o_in = None if O is None else O[s:e]
            out, o = layer_stages(layer, W, X[s:e], self.cos, self.sin, start, stop, o_in,
                                  capture)
            if write:
                X[s:e] = out
            if keep_o:
                O_out[s:e] = o
            return s, e, grams

        # (at most workers + 1 batches started and not yet summed: their Gram matrices
        # are the largest temporaries, 0.65 GiB per batch at LLaMA-7B's shapes)
        for s, e, grams in in_order(self.pool, work, range(0, n, self.batch), self.workers + 1):
            for group, g in grams.items():                     # in batch order
                acc.setdefault(group, HessianAccumulator(g.shape[0])).add_gram(g, (e - s) * T)
            if self.progress is not None:
                self.progress(e - s)
        return acc, O_out


def _dense(layer, names):
    """{name: W_hat (out, in) float32} of the named linears of `layer`, as they are now."""
    return {n: np.ascontiguousarray(layer.linears[n].dequantize(), dtype=np.float32)
            for n in names}


def _before(group):
    """The names of the linears of the groups before `group` (None: all seven)."""
    k = len(LINEAR_GROUPS) if group is None else LINEAR_GROUPS.index(group)
    return [n for g in LINEAR_GROUPS[:k] for n in g]


def capture_hessians(layer, hs, pos, groups, threads=None, calib_batch=None):
    """Run `layer` on every sample in hs, accumulating H for each group in `groups`.

    hs: n x (T, d) or (n, T, d); pos (T,) = 0..T-1.
    Returns {group (tuple of names): H (in, in) float64}. The pass stops at the
    input of the last wanted group (its products are not computed).
    """
    X = np.array(np.stack(hs) if isinstance(hs, (list, tuple)) else hs, dtype=np.float32)
    last = LINEAR_GROUPS[max(LINEAR_GROUPS.index(g) for g in groups)]
    cos, sin = rope_cos_sin(layer.inv_freq, np.asarray(pos))
    calib_batch = calib_batch or default_batch(X.shape[1])
    W = _dense(layer, _before(last))
    with workers(threads) as (pool, n_workers):
        acc, _ = _Pass(pool, n_workers, calib_batch, cos, sin)(
            layer, W, X, "h", last, want=tuple(groups), write=False)
    return {g: acc[g].mean() for g in groups}


def quantize_layers(model, windows, quantize, true_sequential=False, log=None,
                    threads=None, calib_batch=None, progress=None, resume=None, layer_hook=None,
                    quantize_many=None):
    """Quantize every linear of every decoder layer of `model`, in place.

    quantize(name, W, H) -> object with .matmul and .dequantize (the quantized
    weight); it is called with the full tensor name, e.g.
    "model.layers.3.mlp.up_proj", in the order of LINEAR_GROUPS, on the
    calling thread.  Returns the list of what quantize returned, in order, as
    (name, result).

    threads: worker threads for the calibration passes (default: the BLAS's
    thread count): it never changes the result.  calib_batch: samples per
    product and per float32 Gram matrix (default_batch(seqlen)): a memory /
    speed trade-off that changes H only in its float32 rounding.
    log(i, seconds) after each decoder layer; progress(tokens) as calibration
    tokens go through a layer (each layer counts n*T tokens in all).
    resume: a refq.resume.ResumeState; the layers it holds are put back in
    the model (their linears returned, their norms and biases as the layer
    hook left them) instead of being quantized again, and each finished
    layer is saved to it.
    layer_hook(i, layer, X, pos), called before layer i is quantized with its
    inputs X (n, T, d), may return a function called once every linear of the
    layer is quantized, before the layer's outputs are computed (e.g.
    refq.finetune's block fine-tuning, which changes the layer in place).
    quantize_many([(name, W, H), ...]) -> [result, ...], if given, is called
    instead of quantize with every linear that can be quantized at once: the
    seven of a layer (true_sequential: one group) -- refq.cluster runs them as
    parallel tasks.  The results must be those quantize would give.
    """
    n, T = windows.shape
    pos = np.arange(T)
    calib_batch = calib_batch or default_batch(T)
    if calib_batch < 1:
        raise RefqError(f"--calib-batch {calib_batch}: need at least 1 sample per batch")
    X = model.embed(windows)                                            # (n, T, d)
    done, first = [], 0
    if resume is not None:
        first, X_saved, restored, params = resume.restore()
        if first:
            X = X_saved                                                 # input of layer `first`
        for full, q in restored:                     # "model.layers.{i}.{name}"
            _, _, i, name = full.split(".", 3)
            model.layers[int(i)].linears[name] = q
            done.append((full, q))
        for i, p in enumerate(params):               # norms, biases (as fine-tuning left them)
            set_layer_params(model.layers[i], p)
    with workers(threads) as (pool, n_workers):
        for i, layer in enumerate(model.layers):
            if i < first:
                if progress is not None:
                    progress(n * T)
                continue
            t0 = time.perf_counter()
            n_done = len(done)
            inputs = X.copy() if layer_hook is not None else None     # (n, T, d)
            after = layer_hook(i, layer, inputs, pos) if layer_hook is not None else None
            cos, sin = rope_cos_sin(layer.inv_freq, pos)                  # (T, hd)
            passes = 5 if true_sequential else 2
            ticked = [0]                     # tokens reported for this layer (n*T in all)

            def tick(k, passes=passes, ticked=ticked):
                if progress is not None:
                    t = min(k * T // passes, n * T - ticked[0])
                    ticked[0] += t
                    progress(t)

            run = _Pass(pool, n_workers, calib_batch, cos, sin, tick)

            def quantize_groups(*pairs):
                """The linears of each (group, H) given: those of a group share its H."""
                names = [(name, H) for group, H in pairs for name in group]
                items = [(f"model.layers.{i}.{name}",
                          np.asarray(layer.linears[name].dequantize(), dtype=np.float32), H)
                         for name, H in names]                            # W (out, in)
                qs = (quantize_many(items) if quantize_many is not None
                      else [quantize(*item) for item in items])
                for (name, _), (full, _, _), q in zip(names, items, qs):
                    layer.linears[name] = q
                    done.append((full, q))

            if not true_sequential:
                # every H from the original weights, then the quantized layer's outputs
                acc, _ = run(layer, _dense(layer, _before(DOWN)), X, "h", DOWN,
                             want=LINEAR_GROUPS, write=False)
                if quantize_many is None:                      # one group's H at a time
                    for group in LINEAR_GROUPS:
                        quantize_groups((group, acc.pop(group).mean()))
                else:                                          # all seven linears at once
                    quantize_groups(*[(group, acc.pop(group).mean()) for group in LINEAR_GROUPS])
                if after is not None:
                    after()
                run(layer, _dense(layer, _before(None)), X, "h", None)
            else:
                acc, _ = run(layer, {}, X, "h", QKV, want=(QKV,), write=False)
                quantize_groups((QKV, acc[QKV].mean()))
                acc, Ob = run(layer, _dense(layer, QKV), X, "h", O, want=(O,),
                              write=False, keep_o=True)
                quantize_groups((O, acc[O].mean()))
                acc, _ = run(layer, _dense(layer, O), X, "o", GATE_UP, O=Ob,
                             want=(GATE_UP,))                             # X <- h1
                del Ob
                quantize_groups((GATE_UP, acc[GATE_UP].mean()))
                acc, _ = run(layer, _dense(layer, GATE_UP), X, "h1", DOWN, want=(DOWN,),
                             write=False)
                quantize_groups((DOWN, acc[DOWN].mean()))
                if after is None:
                    run(layer, _dense(layer, GATE_UP + DOWN), X, "h1", None)  # X <- output
                else:                            # fine-tuning changes h1 too: from the input
                    after()
                    X[:] = inputs
                    run(layer, _dense(layer, _before(None)), X, "h", None)
            if progress is not None and ticked[0] < n * T:
                progress(n * T - ticked[0])
            if resume is not None:
                resume.save(i, X, done[n_done:], layer)
            if log is not None:
                log(i, time.perf_counter() - t0)
    return done
