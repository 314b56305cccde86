"""A decoder layer over a batch of samples, in stages: what calibration and
perplexity run many tokens through.

    W = prefill_weights(layer)                 # {linear name: dense Ŵ (out, in)}, made once
    out, _ = layer_stages(layer, W, h, cos, sin)          # h (b, T, d) -> (b, T, d)

The same float32 operations as DecoderLayer.forward, arranged for throughput:

  * each linear is ONE product over all b*T tokens of the batch,
    (b*T, in) x (in, out), with a dense Ŵ made once per layer
    (prefill_weight) rather than per product: a packed weight is decoded
    once, not once per window, and the product is a BLAS sgemm (the
    LUT/GEMV kernels of refq.kernels are for decoding a few tokens);
  * attention is per sample, in blocks of queries (model.causal_attention:
    the causal upper half is never computed);
  * silu(gate) * up in place (no temporaries of the widest shape).

A layer is five stages, each ending at the input of a group of linears (or
at the output); calibration stops at a group's input to capture it:

    h ─RMSNorm─> a ─q,k,v + attention─> o ─o_proj + h─> h1 ─RMSNorm─> m
    m ─silu(gate)·up─> g ─down_proj + h1─> out
"""
import numpy as np

from .model import LINEAR_GROUPS, apply_rope, causal_attention, rms_norm

QKV, O, GATE_UP, DOWN = LINEAR_GROUPS


def prefill_weight(linear):
    """What a many-token product of `linear` multiplies by: its dense Ŵ (out, in)
    float32 -- a quantized weight's prefill_weight() (refq.kernels: decoded once by
    the format's row decoder), a dense Linear's own weight (no copy) -- or the
    linear itself when its products must run on its own kernel (a GPU one):
    product() then calls its .matmul."""
    f = getattr(linear, "prefill_weight", None)
    if f is not None:
        return f()
    return np.ascontiguousarray(linear.dequantize(), dtype=np.float32)


def prefill_weights(layer, names=None):
    """{name: prefill_weight} of the named linears of `layer` (default: all seven)."""
    names = layer.linears if names is None else names
    return {n: prefill_weight(layer.linears[n]) for n in names}


def product(x, W, b=None):
    """x (..., in) @ Wᵀ (+ b): one product over all rows of x.  -> (..., out).
    W: (out, in) float32 array (one BLAS sgemm), or an object with .matmul."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ W.T if isinstance(W, np.ndarray) else W.matmul(x2)
    if b is not None:
        y += b
    return y.reshape(x.shape[:-1] + (W.shape[0],))


def silu_times(gate, up):
    """silu(gate) * up, computed in place in gate: the float32 operations of
    llama_np's silu(gate) * up, without its temporaries.  (b, T, ff)."""
    t = np.negative(gate)
    np.exp(t, out=t)
    t += np.float32(1.0)
    gate /= t                                   # silu(gate) = gate / (1 + exp(-gate))
    gate *= up
    return gate


def attention_output(layer, W, a, cos, sin):
    """o = attention(q, k, v) from a = RMSNorm(h).  a (b, T, d) -> (b, T, nh*hd)."""
    cfg = layer.cfg
    bsz, T, _ = a.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bias = layer.biases.get
    q = product(a, W["self_attn.q_proj"], bias("self_attn.q_proj")).reshape(bsz, T, nh, hd)
    k = product(a, W["self_attn.k_proj"], bias("self_attn.k_proj")).reshape(bsz, T, nkv, hd)
    v = product(a, W["self_attn.v_proj"], bias("self_attn.v_proj")).reshape(bsz, T, nkv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)              # (b, T, heads, hd)
    return np.stack([causal_attention(q[j], k[j], v[j]) for j in range(bsz)])


def layer_stages(layer, W, h, cos, sin, start="h", stop=None, o=None, capture=None):
    """Run decoder layer `layer` on a batch of samples, from `start` to `stop`.

    W: {linear name: prefill_weight} the weights to use (dense Ŵ).
    start: "h"  (h is the layer input),
           "o"  (h is the layer input and o its attention output, kept),
           "h1" (h is h1 = input + attention, kept).
    stop: the group of linears whose input ends the run (that input is
    captured, not multiplied), or None for the layer's output.
    capture(group, x) is called with each group's input x (b, T, in) met on the way.
    Returns (h or h1 or out, o or None): what the next stage starts from.
    h (b, T, d) float32 (every sample at positions 0..T-1); cos, sin (T, hd).
    """
    eps = layer.cfg.rms_norm_eps
    capture = capture or (lambda g, x: None)
    if start == "h":
        a = rms_norm(h, layer.input_norm, eps)                           # (b, T, d)
        capture(QKV, a)
        if stop == QKV:
            return h, None
        o = attention_output(layer, W, a, cos, sin)                      # (b, T, nh*hd)
        start = "o"
    if start == "o":
        capture(O, o)
        if stop == O:
            return h, o
        h = h + product(o, W["self_attn.o_proj"])                        # h1 (b, T, d)
    m = rms_norm(h, layer.post_norm, eps)                                # (b, T, d)
    capture(GATE_UP, m)
    if stop == GATE_UP:
        return h, None
    g = silu_times(product(m, W["mlp.gate_proj"]), product(m, W["mlp.up_proj"]))  # (b, T, ff)
    capture(DOWN, g)
    if stop == DOWN:
        return h, None
    return h + product(g, W["mlp.down_proj"]), None                      # (b, T, d)
