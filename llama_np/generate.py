"""Perplexity and text generation on top of Llama.forward."""
import numpy as np

from .parallel import in_order, numba_threadsafe, workers


NLL_ROWS = 4        # rows of logits per step of log_softmax_nll (4 x 49152 floats: in L2)


def log_softmax_nll(logits, targets):
    """−log p(target) per row.  logits (T, V) float32, targets (T,) -> (T,) float64.

        −log p(y_t) = logsumexp(z_t) − z_t[y_t],   logsumexp(z) = m + log Σ_v exp(z_v − m)

    with m = max_v z_v; exp in the logits' dtype (float32; float64 in the
    float64 checks), the sum over v in float64.  Computed
    NLL_ROWS rows at a time in one small buffer, so each row is read from
    memory once and z − m, exp and the sum stay in cache (the whole (T, V)
    temporaries were most of its time); the same operations on the same
    values, row by row, so the same bits.
    """
    T, V = logits.shape
    lse = np.empty(T, np.float64)                                    # (T,)
    buf = np.empty((min(NLL_ROWS, T), V), logits.dtype)
    for s in range(0, T, NLL_ROWS):
        e = min(s + NLL_ROWS, T)
        z, b = logits[s:e], buf[:e - s]                              # (r, V)
        m = z.max(axis=-1, keepdims=True)                            # (r, 1)
        np.subtract(z, m, out=b)
        np.exp(b, out=b)
        lse[s:e] = m[:, 0].astype(np.float64) + np.log(b.sum(axis=-1, dtype=np.float64))
    return lse - logits[np.arange(T), targets].astype(np.float64)


PROTOCOLS = ("refq", "gptq", "llama.cpp")


def eval_windows(ids, ctx=512, protocol="refq", bos_id=None):
    """The windows a perplexity protocol scores: a list of (window (L,), first).

    The model runs on window[:-1] from position 0; the logits at positions
    first..L-2 predict window[first+1..L-1], and only those are scored.

    refq       non-overlapping windows of ctx tokens; every token but the
               first of each is scored (first = 0); a last partial window
               counts if it has >= 2 tokens.
    gptq       the GPTQ reference (IST-DASLab/gptq, llama.py llama_eval):
               len(ids) // ctx windows of ctx tokens, the remainder dropped;
               first = 0 (ctx - 1 scored per window).
    llama.cpp  llama-perplexity (tools/perplexity/perplexity.cpp, perplexity()):
               len(ids) // ctx chunks of ctx tokens, the remainder dropped;
               first = ctx // 2 (ctx - 1 - ctx // 2 scored per chunk); with
               bos_id set (a vocabulary that adds BOS), the chunk's first
               token is replaced by BOS before the forward pass. ids are the
               text's tokens with BOS prepended when the vocabulary adds one.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if protocol == "refq":
        return [(ids[s:s + ctx], 0) for s in range(0, len(ids), ctx) if len(ids) - s >= 2]
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}")
    out = []
    for i in range(len(ids) // ctx):
        w = ids[i * ctx:(i + 1) * ctx].copy()
        if protocol == "llama.cpp" and bos_id is not None:
            w[0] = bos_id
        out.append((w, 0 if protocol == "gptq" else ctx // 2))
    return out


def log_softmax(logits):
    """(T, V) float32 -> (T, V) float64 log-probabilities (max subtracted first)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# How perplexity runs many windows (none of it changes a result):
BATCH_TOKENS = 512          # tokens per batch of windows (one of 512; 4 of 128): one product
                            # per linear (1024 and 2048: no faster, and 2 windows then ran
                            # on one worker)
CHUNK_FLOATS = 1 << 26      # hidden states held at once: chunk tokens x d floats (256 MiB)
HEAD_FLOATS = 1 << 25       # logits per head product: rows x vocab floats (128 MiB)


def _chunks(windows, per_chunk):
    """[(i, j)]: consecutive windows i..j-1 of at most per_chunk tokens (one at least)."""
    out, i = [], 0
    while i < len(windows):
        j, tokens = i + 1, len(windows[i][0])
        while j < len(windows) and tokens + len(windows[j][0]) <= per_chunk:
            tokens += len(windows[j][0])
            j += 1
        out.append((i, j))
        i = j
    return out


def _batches(chunk):
    """[(k, e)]: consecutive windows k..e-1 of one length, BATCH_TOKENS tokens at most."""
    out, k = [], 0
    while k < len(chunk):
        L = len(chunk[k][0])
        e = k + 1
        while e < len(chunk) and len(chunk[e][0]) == L and (e - k + 1) * (L - 1) <= BATCH_TOKENS:
            e += 1
        out.append((k, e))
        k = e
    return out


def final_hidden(model, windows, pool, n_workers, progress=None):
    """The last decoder layer's outputs on each window's input window[:-1], computed
    layer by layer over many windows at once, as calibration does (llama_np.batched),
    rather than window by window through Llama.forward:

        X = embed(windows[:, :-1])                 a chunk of windows (n, L-1, d)
        for each decoder layer:
            W = the layer's dense Ŵ                decoded once per chunk (prefill_weight)
                                                   on the workers, a linear each
            X[batch] = layer(X[batch]; W)          batches of BATCH_TOKENS, on the workers

    A chunk is the consecutive windows whose hidden states fit in CHUNK_FLOATS (all
    of SmolLM2's eval.txt).  Each batch runs whole on one worker thread with single-
    threaded BLAS (llama_np.parallel.workers), and the batches do not depend on the
    number of workers: neither do the results.  Per token, the operations are
    Llama.forward's, except that a linear is one product over the batch's rows
    (OpenBLAS may then round some shapes' sums otherwise in the last bit).

    Yields, per chunk, (chunk [(window, first)], hs, reported): hs[w] (L_w - 1, d) for
    window w of the chunk, and the tokens given to progress(tokens) so far for the
    chunk (len(window) per window in all, as layers finish; the caller reports the
    rest when it is done with the chunk).
    """
    from .batched import layer_stages, prefill_weight
    from .model import rope_cos_sin

    steps = len(model.layers) + 1                        # the layers, then the caller's head
    for i, j in _chunks(windows, max(1, CHUNK_FLOATS // model.cfg.hidden_size)):
        chunk = windows[i:j]
        tokens = sum(len(w) for w, _ in chunk)
        batches = _batches(chunk)
        X = [model.embed(np.stack([w[:-1] for w, _ in chunk[k:e]])) for k, e in batches]
        # the small batches first: they finish early and leave no worker idle at the end
        order = sorted(range(len(batches)), key=lambda b: X[b].size)
        done = 0
        for li, layer in enumerate(model.layers):
            # {name: Ŵ (out, in)}, once per chunk, a linear per worker (the widest first)
            names = sorted(layer.linears, key=lambda n: -np.prod(layer.linears[n].shape))
            W = dict(zip(names, in_order(pool, lambda n, layer=layer: prefill_weight(
                layer.linears[n]), names, n_workers)))

            def run(b, layer=layer, W=W):
                T = X[b].shape[1]
                cos, sin = rope_cos_sin(layer.inv_freq, np.arange(T))   # (T, hd)
                X[b] = layer_stages(layer, W, X[b], cos, sin)[0]        # (n_b, T, d)
            for _ in in_order(pool, run, order, n_workers):
                pass
            if progress is not None:
                now = tokens * (li + 1) // steps
                progress(now - done)
                done = now
        yield chunk, [X[b][w - k] for b, (k, e) in enumerate(batches) for w in range(k, e)], done


def window_nlls(model, windows, threads=None, progress=None):
    """Σ −log p over the scored tokens of each window of `windows` ([(window (L,),
    first)], eval_windows): a list of float64, in window order.

    final_hidden, then per window, on the workers: logits = head(h[first:]) for
    HEAD_FLOATS / vocab rows at a time, and the sum of log_softmax_nll over them.
    """
    head_rows = max(1, HEAD_FLOATS // model.cfg.vocab_size)
    out = []
    with workers(threads) as (pool, n_workers):
        for chunk, hs, done in final_hidden(model, windows, pool, n_workers, progress):
            def head(w):
                (win, first), h = chunk[w], hs[w]                       # h (L-1, d)
                nll = [log_softmax_nll(model.head(h[r:r + head_rows]),  # (rows, V)
                                       win[r + 1:r + 1 + head_rows])
                       for r in range(first, len(win) - 1, head_rows)]
                return float(np.concatenate(nll).sum()) if nll else 0.0
            out.extend(in_order(pool, head, range(len(chunk)), n_workers))
            if progress is not None:
                progress(sum(len(w) for w, _ in chunk) - done)
    return out


def perplexity(model, ids, ctx=512, progress=None, protocol="refq", bos_id=None, threads=None):
    """exp(mean NLL) over the tokens that `protocol` scores (see eval_windows).

    The default (refq): non-overlapping windows of ctx tokens, each starting
    fresh at position 0 (no BOS) and predicting its tokens 1..len-1; a last
    partial window counts if it has >= 2 tokens.  The windows run through the
    model together, layer by layer, on `threads` worker threads (default: the
    BLAS's thread count; window_nlls), their sums added in window order: the
    result does not depend on the thread count.
    Returns (ppl, n_predicted, nll_sum).
    """
    if not numba_threadsafe():      # quantized kernels may not run on two threads at once
        threads = 1
    windows = eval_windows(ids, ctx, protocol, bos_id)
    nll, n = 0.0, 0
    for (w, first), nll_w in zip(windows, window_nlls(model, windows, threads, progress)):
        nll += nll_w
        n += len(w) - 1 - first
    if n == 0:
        raise ValueError("no token to score")
    return float(np.exp(nll / n)), n, nll


def kl_divergence(model, reference, ids, ctx=512, progress=None, protocol="refq", bos_id=None,
                  threads=None):
    """How far `model`'s next-token distributions are from `reference`'s.

    On the tokens `protocol` scores, per token t: KL(P_ref,t || P_model,t) =
    sum_v p_ref(v) (log p_ref(v) - log p_model(v)) and whether both argmaxes
    agree; as llama-perplexity --kl-divergence reports ("Mean KLD", "Same top
    p"). Returns {"kld" (mean), "kld_median", "kld_p99", "top1" (fraction),
    "ppl", "ppl_reference", "tokens"}.  Both models run as in perplexity
    (final_hidden, the same hidden states).
    """
    if not numba_threadsafe():
        threads = 1
    windows = eval_windows(ids, ctx, protocol, bos_id)
    klds, same, nll, nll_ref = [], 0, 0.0, 0.0
    with workers(threads) as (pool, n_workers):
        # the reference's progress is not shown: the bar counts the model's tokens
        for (chunk, hs, done), (_, hs_ref, _) in zip(
                final_hidden(model, windows, pool, n_workers, progress),
                final_hidden(reference, windows, pool, n_workers)):
            for (w, first), h, h_ref in zip(chunk, hs, hs_ref):
                lq = log_softmax(model.head(h[first:]))                 # (n, V) float64
                lp = log_softmax(reference.head(h_ref[first:]))         # (n, V)
                klds.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
                same += int((lq.argmax(-1) == lp.argmax(-1)).sum())
                tgt = w[first + 1:]
                nll -= float(lq[np.arange(len(tgt)), tgt].sum())
                nll_ref -= float(lp[np.arange(len(tgt)), tgt].sum())
            if progress is not None:
                progress(sum(len(w) for w, _ in chunk) - done)
    k = np.concatenate(klds)
    n = len(k)
    return {"kld": float(k.mean()), "kld_median": float(np.median(k)),
            "kld_p99": float(np.percentile(k, 99)), "top1": same / n,
            "ppl": float(np.exp(nll / n)), "ppl_reference": float(np.exp(nll_ref / n)),
            "tokens": n}


def sample_next(logits, rng, temperature=0.0, top_p=1.0):
    """The next token from the last position's logits (V,).

    temperature 0: argmax (greedy). Otherwise softmax(logits / T), then keep the
    smallest set of most likely tokens whose probability reaches top_p.
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p   # tokens before the mass reaches top_p
        p_kept = np.zeros_like(p)
        p_kept[order[keep]] = p[order[keep]]
        p = p_kept / p_kept.sum()
    return int(rng.choice(len(p), p=p))


def generate(model, prompt_ids, max_new_tokens=32, temperature=0.0, top_p=1.0,
             seed=0, stop_ids=(), on_token=None):
    """Prompt, then one token at a time through the KV cache. Returns new ids."""
    rng = np.random.default_rng(seed)
    prompt_ids = list(prompt_ids)
    cache = model.new_cache(len(prompt_ids) + max_new_tokens)
    logits = model.forward(np.array(prompt_ids), cache=cache)[-1]
    out = []
    for _ in range(max_new_tokens):
        t = sample_next(logits, rng, temperature, top_p)
        if t in stop_ids:
            break
        out.append(t)
        if on_token is not None:
            on_token(t)
        if len(out) == max_new_tokens:
            break
        logits = model.forward(np.array([t]), cache=cache)[-1]
    return out
