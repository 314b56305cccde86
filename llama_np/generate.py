"""Perplexity and text generation on top of Llama.forward."""
import numpy as np


def log_softmax_nll(logits, targets):
    """−log p(target) per row.  logits (T, V) float32, targets (T,) -> (T,) float64.

    logsumexp with the max subtracted; exp in float32, sums in float64.
    """
    m = logits.max(axis=-1, keepdims=True)
    lse = m[:, 0].astype(np.float64) + np.log(
        np.exp(logits - m).sum(axis=-1, dtype=np.float64))
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


def perplexity(model, ids, ctx=512, progress=None, threads=None):
    """exp(mean NLL) over non-overlapping windows of ctx tokens.

    Each window starts fresh at position 0 (no BOS) and predicts its tokens
    1..len−1; a last partial window counts if it has >= 2 tokens.  The
    windows run on `threads` worker threads (default: the BLAS's thread
    count; llama_np.parallel), their sums added in window order: the result
    does not depend on the thread count.
    Returns (ppl, n_predicted, nll_sum).
    """
    from .parallel import numba_threadsafe, ordered_map
    ids = np.asarray(ids, dtype=np.int64)
    starts = [s for s in range(0, len(ids), ctx) if len(ids) - s >= 2]

    def window(s):
        w = ids[s:s + ctx]
        logits = model.forward(w[:-1])                   # (len-1, V)
        return float(log_softmax_nll(logits, w[1:]).sum()), len(w)

    if not numba_threadsafe():      # quantized kernels may not run on two threads at once
        threads = 1
    nll, n = 0.0, 0
    for nll_w, len_w in ordered_map(window, starts, threads):
        nll += nll_w
        n += len_w - 1
        if progress is not None:
            progress(len_w)
    return float(np.exp(nll / n)), n, nll


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
