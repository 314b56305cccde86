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


def perplexity(model, ids, ctx=512, progress=None, protocol="refq", bos_id=None, threads=None):
    """exp(mean NLL) over the tokens that `protocol` scores (see eval_windows).

    The default (refq): non-overlapping windows of ctx tokens, each starting
    fresh at position 0 (no BOS) and predicting its tokens 1..len-1; a last
    partial window counts if it has >= 2 tokens.  The windows run on `threads`
    worker threads (default: the BLAS's thread count; llama_np.parallel), their
    sums added in window order: the result does not depend on the thread count.
    Returns (ppl, n_predicted, nll_sum).
    """
    from .parallel import numba_threadsafe, ordered_map

    def window(wf):
        w, first = wf
        logits = model.forward(w[:-1])[first:]           # (len-1-first, V)
        return float(log_softmax_nll(logits, w[first + 1:]).sum()), len(w), first

    if not numba_threadsafe():      # quantized kernels may not run on two threads at once
        threads = 1
    nll, n = 0.0, 0
    for nll_w, len_w, first in ordered_map(window, eval_windows(ids, ctx, protocol, bos_id),
                                           threads):
        nll += nll_w
        n += len_w - 1 - first
        if progress is not None:
            progress(len_w)
    if n == 0:
        raise ValueError("no token to score")
    return float(np.exp(nll / n)), n, nll


def kl_divergence(model, reference, ids, ctx=512, progress=None, protocol="refq", bos_id=None):
    """How far `model`'s next-token distributions are from `reference`'s.

    On the tokens `protocol` scores, per token t: KL(P_ref,t || P_model,t) =
    sum_v p_ref(v) (log p_ref(v) - log p_model(v)) and whether both argmaxes
    agree; as llama-perplexity --kl-divergence reports ("Mean KLD", "Same top
    p"). Returns {"kld" (mean), "kld_median", "kld_p99", "top1" (fraction),
    "ppl", "ppl_reference", "tokens"}.
    """
    klds, same, nll, nll_ref = [], 0, 0.0, 0.0
    for w, first in eval_windows(ids, ctx, protocol, bos_id):
        lq = log_softmax(model.forward(w[:-1])[first:])          # (n, V) float64
        lp = log_softmax(reference.forward(w[:-1])[first:])      # (n, V)
        klds.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        same += int((lq.argmax(-1) == lp.argmax(-1)).sum())
        tgt = w[first + 1:]
        nll -= float(lq[np.arange(len(tgt)), tgt].sum())
        nll_ref -= float(lp[np.arange(len(tgt)), tgt].sum())
        if progress is not None:
            progress(len(w))
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
