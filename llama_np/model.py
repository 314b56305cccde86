"""A LLaMA forward pass in numpy, top to bottom.

    ids (T,)
     │ embed_tokens                                     h (T, d)
     ▼
    ┌─ decoder layer ×L ─────────────────────────────────────────────┐
    │ a = RMSNorm(h) · w_in                                          │
    │ q, k, v = a Wqᵀ (+bq), a Wkᵀ (+bk), a Wvᵀ (+bv)                │
    │ q, k = RoPE(q, pos), RoPE(k, pos)                              │
    │ o = softmax(q kᵀ / √hd + causal mask) v   (grouped-query)      │
    │ h = h + o Woᵀ                                                  │
    │ m = RMSNorm(h) · w_post                                        │
    │ h = h + (silu(m Wgᵀ) ⊙ (m Wuᵀ)) Wdᵀ        (SwiGLU MLP)        │
    └────────────────────────────────────────────────────────────────┘
     │ RMSNorm · w_final, then lm_head (or the tied embedding)
     ▼
    logits (T, vocab)

Everything is float32, as in transformers' fp32 path. Two hooks serve the
quantization code:
  * every linear layer is an object with `.matmul(x)` (x (..., in) -> (..., out)),
    so a quantized weight can replace `layer.linears[name]`;
  * `DecoderLayer.forward(h, pos, on_input=f)` calls f(names, x) with the input
    x (T, in) of each group of linears sharing that input, before using it.
A linear may also offer `.fuse(others)`: an object whose `.products(x)` gives
the group's outputs from one call (DecoderLayer.products; refq's packed weights
do, see refq.kernels.fuse).
"""
import math

import numpy as np

from .checkpoint import Checkpoint
from .config import LlamaConfig

# The seven linear layers of a decoder layer, grouped by the input they share.
# Names are those of Hugging Face checkpoints, relative to model.layers.{i}.
LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # input: RMSNorm(h)
    ("self_attn.o_proj",),                                        # input: attention output
    ("mlp.gate_proj", "mlp.up_proj"),                             # input: RMSNorm(h)
    ("mlp.down_proj",),                                           # input: silu(g) * u
)
LINEAR_NAMES = tuple(n for group in LINEAR_GROUPS for n in group)


class Linear:
    """A dense linear layer without bias: y = x Wᵀ, W (out, in) float32."""

    def __init__(self, weight):
        self.weight = weight                                     # (out, in)
        self.shape = weight.shape

    def matmul(self, x):                                         # (..., in) -> (..., out)
        return x @ self.weight.T

    def dequantize(self):
        return np.asarray(self.weight, dtype=np.float32)


def rms_norm(x, w, eps):
    """x / sqrt(mean(x²) + eps) · w, per row.  x (T, d), w (d,)."""
    # np.mean's sum and division, without its Python wrapper (a decode step
    # normalises 2 x layers single rows): the same float32 values
    var = np.add.reduce(x * x, axis=-1, keepdims=True) / np.float32(x.shape[-1])
    return (x / np.sqrt(var + np.float32(eps))) * w


def silu(x):
    return x / (np.float32(1.0) + np.exp(-x))


def rope_inv_freq(cfg):
    """The RoPE frequencies θ_i = base^(−2i/hd), i < hd/2, with optional scaling.

    Computed in float32 like transformers, so that angles match it bit for bit
    up to the last rounding of pow.
    """
    hd = cfg.head_dim
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta)
           ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    factor = float(sc["factor"])
    if sc["rope_type"] == "linear":          # positions / factor
        return (inv / np.float32(factor)).astype(np.float32)
    # llama3 (Llama 3.1): long wavelengths slowed by `factor`, short ones kept,
    # a linear blend in between.
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, blended, out).astype(np.float32)


def rope_cos_sin(inv_freq, pos):
    """cos and sin of the angles pos · θ, each (T, hd), the halves repeated."""
    ang = pos.astype(np.float32)[:, None] * inv_freq[None, :]      # (T, hd/2)
    ang = np.concatenate([ang, ang], axis=-1)                      # (T, hd)
    return np.cos(ang), np.sin(ang)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by the position's angle (HF's rotate_half).

    x (T, n_heads, hd); cos, sin (T, hd).
    """
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def attention(q, k, v, pos):
    """softmax(q kᵀ / √hd + causal mask) v, grouped-query: the plain form (the spec).

    q (T, nh, hd) at positions pos (T,); k, v (S, nkv, hd) at positions 0..S-1.
    Query t sees the keys at positions <= pos[t]. -> (T, nh*hd).
    """
    T, nh, hd = q.shape
    S, nkv = k.shape[0], k.shape[1]
    rep = nh // nkv                     # query heads per key/value head
    # (contiguous copies: numpy's stacked matmul only uses BLAS on those)
    qg = np.ascontiguousarray(q.reshape(T, nkv, rep, hd).transpose(1, 2, 0, 3))  # (nkv, rep, T, hd)
    kg = np.ascontiguousarray(k.transpose(1, 2, 0))                  # (nkv, hd, S)
    vg = np.ascontiguousarray(v.transpose(1, 0, 2))                  # (nkv, S, hd)
    scores = qg @ kg[:, None]                                        # (nkv, rep, T, S)
    scores *= np.float32(1.0 / math.sqrt(hd))
    masked = np.arange(S)[None, :] > pos[:, None]                    # (T, S)
    scores += np.where(masked, np.float32(-np.inf), np.float32(0.0))
    # softmax over keys, in place (the largest temporaries of the forward pass)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores, out=scores)
    p /= p.sum(axis=-1, keepdims=True)
    o = p @ vg[:, None]                                              # (nkv, rep, T, hd)
    return o.transpose(2, 0, 1, 3).reshape(T, nh * hd)               # (T, nh*hd)


def decode_attention(q, k, v):
    """attention() for ONE query that sees every key (a decode step: the query is
    the last position of the cache), without the mask and the copies.

    q (1, nh, hd); k, v (nkv, S, hd) head-major (the KVCache layout) -> (1, nh*hd).
    The rep query heads of a key/value head are the rows of one product.
    """
    _, nh, hd = q.shape
    nkv = k.shape[0]
    qg = q.reshape(nkv, nh // nkv, hd)                               # (nkv, rep, hd)
    scores = qg @ k.transpose(0, 2, 1)                               # (nkv, rep, S)
    scores *= np.float32(1.0 / math.sqrt(hd))
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores, out=scores)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).reshape(1, nh * hd)                               # (nkv, rep, hd) -> (1, nh*hd)


ATTN_BLOCK = 64         # queries per block in causal_attention


def causal_attention(q, k, v, block=ATTN_BLOCK):
    """attention(q, k, v, pos) when keys and queries share positions (no
    cache), computed in blocks of `block` queries:

        keys  0 ......... s ... e
        [ done ][ B_0 ]                 block of queries s..e-1 sees keys 0..e-1:
        [     done    ][ B_1 ]          the keys after e (the upper half of the
        [         done       ][ B_2 ]   full T x T matrix) are never computed,
                                        and only the diagonal block is masked.

    The rep query heads of a key/value head are rows of one product: row
    t*rep + r is query t of head kv*rep + r.  q (T, nh, hd); k, v (T, nkv, hd)
    -> (T, nh*hd). Per row, the sums of attention() over the unmasked keys
    (in another float32 order).
    """
    T, nh, hd = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    qg = np.ascontiguousarray(q.reshape(T, nkv, rep, hd).transpose(1, 0, 2, 3))
    qg = qg.reshape(nkv, T * rep, hd)                                # (nkv, T*rep, hd)
    kg = np.ascontiguousarray(k.transpose(1, 2, 0))                  # (nkv, hd, T)
    vg = np.ascontiguousarray(v.transpose(1, 0, 2))                  # (nkv, T, hd)
    scale = np.float32(1.0 / math.sqrt(hd))
    upper = np.triu(np.full((block, block), -np.inf, np.float32), 1)  # (B, B) diagonal block's mask
    upper = np.repeat(upper, rep, axis=0)                            # (B*rep, B): rows per query
    o = np.empty((T, nkv, rep, hd), np.float32)
    for s in range(0, T, block):
        e = min(s + block, T)
        scores = qg[:, s * rep:e * rep] @ kg[..., :e]                # (nkv, (e-s)*rep, e)
        scores *= scale
        scores[..., s:e] += upper[:(e - s) * rep, :e - s]            # query t sees keys <= t
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores, out=scores)
        p /= p.sum(axis=-1, keepdims=True)
        ob = p @ vg[:, :e]                                           # (nkv, (e-s)*rep, hd)
        o[s:e] = ob.reshape(nkv, e - s, rep, hd).transpose(1, 0, 2, 3)
    return o.reshape(T, nh * hd)


class KVCache:
    """Keys and values of past positions, per layer, preallocated to max_len.

    Head-major: the keys of one head are consecutive rows, so a decode step's
    products read k[layer, head, :S] (S, hd) in place (decode_attention).
    """

    def __init__(self, cfg, max_len):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)    # (L, n_kv, max_len, hd)
        self.v = np.zeros(shape, np.float32)    # (L, n_kv, max_len, hd)
        self.max_len = max_len
        self.length = 0                         # positions filled so far


class DecoderLayer:
    def __init__(self, cfg, index, get, get_linear=None):
        """get(name, shape) -> float32 array; name relative to the layer.

        get_linear(name, shape) -> an object with .matmul, for the seven linear
        layers (default: Linear(get(name + ".weight", shape))); a packed
        checkpoint passes one that builds quantized weights.
        """
        d, hd = cfg.hidden_size, cfg.head_dim
        nh, nkv, ff = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        self.cfg, self.index = cfg, index
        self.inv_freq = rope_inv_freq(cfg)                              # (hd/2,)
        self.input_norm = get("input_layernorm.weight", (d,))            # (d,)
        self.post_norm = get("post_attention_layernorm.weight", (d,))    # (d,)
        shapes = {
            "self_attn.q_proj": (nh * hd, d), "self_attn.k_proj": (nkv * hd, d),
            "self_attn.v_proj": (nkv * hd, d), "self_attn.o_proj": (d, nh * hd),
            "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff),
        }
        if get_linear is None:
            get_linear = lambda n, s: Linear(get(n + ".weight", s))
        self.linears = {n: get_linear(n, s) for n, s in shapes.items()}
        self.biases = {}                                                 # name -> (out,)
        if cfg.attention_bias:
            for n in LINEAR_GROUPS[0]:
                self.biases[n] = get(n + ".bias", (shapes[n][0],))
        self._fused = {}            # group -> (its linears, their fused product or None)

    # Multiply the linears of a group (same input) as one stacked weight where
    # they allow it (see products); False: always one product per linear.
    fuse = True

    def _fused_product(self, group):
        """The linears of `group` as one product (the first one's .fuse(others):
        refq's packed weights of one layout), or None; rebuilt when a linear of
        the group is replaced (calibration swaps quantized weights in) or its
        .kernel changes."""
        lins = [self.linears[n] for n in group]
        key = lins + [getattr(lin, "kernel", None) for lin in lins]      # and their kernels
        cached = self._fused.get(group)
        if cached is None or any(a is not b for a, b in zip(cached[0], key)):
            make = getattr(lins[0], "fuse", None)
            cached = (key, None if make is None else make(lins[1:]))
            self._fused[group] = cached
        return cached[1]

    def products(self, group, x):
        """[x Wᵀ (+ b) for each linear W of `group`], the linears sharing the input x.

        Where they can be multiplied as ONE stacked weight [W_1; W_2; ...] (e.g.
        GPTQ's q/k/v and gate/up: same packed layout, and the same act-order
        permutation since they share a Hessian), one product, split back by
        columns: the per-call work around a kernel is paid once, not per linear.
        Each output row is the same as its own product's. Dense linears: one
        product each (a stacked copy of memory-mapped weights would cost memory).
        """
        fused = self._fused_product(group) if self.fuse and len(group) > 1 else None
        if fused is None:
            ys = [self.linears[n].matmul(x) for n in group]
        else:
            ys = fused.products(x)                                       # [(T, out)] per linear
        bs = [self.biases.get(n) for n in group]
        return [y if b is None else y + b for y, b in zip(ys, bs)]

    def forward(self, h, pos, cache=None, on_input=None, rope=None):
        """One decoder layer.  h (T, d) float32; pos (T,) absolute positions;
        rope: (cos, sin) = rope_cos_sin(self.inv_freq, pos) if already computed.

        With a cache, the new keys/values are written at cache rows pos and
        attention sees all positions < pos[-1] + 1 (pos must continue the cache).
        """
        cfg = self.cfg
        T = h.shape[0]
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        # --- attention ---
        a = rms_norm(h, self.input_norm, cfg.rms_norm_eps)               # (T, d)
        if on_input is not None:
            on_input(LINEAR_GROUPS[0], a)
        q, k, v = self.products(LINEAR_GROUPS[0], a)
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        cos, sin = rope_cos_sin(self.inv_freq, pos) if rope is None else rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:   # keys at the queries' positions: blocks, the masked half skipped
            o = causal_attention(q, k, v)                                # (T, nh*hd)
        else:
            kc, vc = cache.k[self.index], cache.v[self.index]            # (nkv, max_len, hd)
            kc[:, pos] = k.transpose(1, 0, 2)
            vc[:, pos] = v.transpose(1, 0, 2)
            S = int(pos[-1]) + 1
            k, v = kc[:, :S], vc[:, :S]                                  # (nkv, S, hd)
            if T == 1:      # a decode step: one query, every key visible
                o = decode_attention(q, k, v)                            # (1, nh*hd)
            else:
                o = attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), pos)
        if on_input is not None:
            on_input(LINEAR_GROUPS[1], o)
        h = h + self.products(LINEAR_GROUPS[1], o)[0]

        # --- SwiGLU MLP ---
        m = rms_norm(h, self.post_norm, cfg.rms_norm_eps)                # (T, d)
        if on_input is not None:
            on_input(LINEAR_GROUPS[2], m)
        gate, up = self.products(LINEAR_GROUPS[2], m)
        g = silu(gate) * up                                              # (T, ff)
        if on_input is not None:
            on_input(LINEAR_GROUPS[3], g)
        return h + self.products(LINEAR_GROUPS[3], g)[0]


class Llama:
    """The whole model: embedding, decoder layers, final norm, lm_head."""

    def __init__(self, cfg, get, get_linear=None):
        """get(name, shape) -> float32 array for a full checkpoint tensor name;
        get_linear(name, shape) -> object with .matmul for a full linear name
        (e.g. "model.layers.0.mlp.up_proj"), or None for dense weights."""
        self.cfg = cfg
        d, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = get("model.embed_tokens.weight", (V, d))     # (V, d)
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}."
            lin = None if get_linear is None else (lambda n, s, p=pre: get_linear(p + n, s))
            self.layers.append(DecoderLayer(cfg, i, lambda n, s, p=pre: get(p + n, s), lin))
        self.norm = get("model.norm.weight", (d,))                       # (d,)
        if cfg.tie_word_embeddings:
            self.lm_head = Linear(self.embed_tokens)
        else:
            self.lm_head = Linear(get("lm_head.weight", (V, d)))

    # The three stages separately, for layer-by-layer calibration.
    def embed(self, ids):                                                # (T,) -> (T, d)
        return np.asarray(self.embed_tokens[np.asarray(ids)], dtype=np.float32)

    def head(self, h):                                                   # (T, d) -> (T, V)
        return self.lm_head.matmul(rms_norm(h, self.norm, self.cfg.rms_norm_eps))

    def new_cache(self, max_len):
        return KVCache(self.cfg, max_len)

    def forward(self, ids, cache=None):
        """Logits (T, vocab) float32 for token ids (T,).

        Without a cache the ids are positions 0..T-1. With one, they continue
        it at positions cache.length.. and the cache grows by T.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        start = 0 if cache is None else cache.length
        pos = np.arange(start, start + len(ids))
        if cache is not None and pos[-1] >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, "
                             f"needs {pos[-1] + 1}")
        h = self.embed(ids)
        rope = rope_cos_sin(self.layers[0].inv_freq, pos)               # the same for every layer
        for layer in self.layers:
            h = layer.forward(h, pos, cache, rope=rope)
        if cache is not None:
            cache.length = start + len(ids)
        return self.head(h)


def load_model(folder):
    """A Llama from a Hugging Face folder (config.json + *.safetensors)."""
    cfg = LlamaConfig.load(folder)
    ckpt = Checkpoint(folder)
    return Llama(cfg, ckpt.get)
