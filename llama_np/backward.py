"""The backward pass of llama_np.model, written out op by op, top to bottom.

    loss, grads = loss_and_grads(model, ids)

ids (T,) is one window of token ids; the model reads ids[:-1] at positions
0..T-2 and predicts ids[1:], so that

    loss = mean over t = 1..T-1 of  −log softmax(logits_{t-1})[ids_t]

exactly the NLL that llama_np.perplexity sums for a window.  grads maps each
parameter's Hugging Face tensor name to dloss/dparameter, the parameter's
shape; a tied embedding has one entry (the sum of the embedding's gradient and
the head's).

Every operation of the forward pass appears below as a pair, `op_forward`
(returns its output and what its backward needs) and `op_backward` (takes the
gradient of the loss with respect to the output, written dy, and returns the
gradients with respect to the inputs and parameters), with the derivative in
the docstring.  The model-level functions at the end chain them like llm.c's
hand-written backward: a forward that keeps one window's activations, then the
ops in reverse.

Precision: float32 by default (as the forward); dtype=np.float64 runs the same
code with every parameter and activation in float64, for checking (the RoPE
angles stay those of the float32 forward: they are constants).

Packed checkpoints (refq): a quantized linear enters through its dequantized
weight Ŵ (float32).  dloss/dŴ is then carried to the continuous stored fields
that a method can fine-tune (FIELD_GRADS below):
  additive (AQLM)   Ŵ[i, kg:(k+1)g] = s_i Σ_m C_m[b_ikm]
                    -> "<name>.codebooks" (M, 2^B, g), "<name>.scales" (out,)
  row_lut (SqueezeLLM)  Ŵ[r, c] = lut[r, code_rc] + S[r, c]
                    -> "<name>.lut" (out, 2^b)   (the outliers S: not given)
  slim with float16 adapters   Ŵ = W_c + L R
                    -> "<name>.lora_L" (out, r), "<name>.lora_R" (r, in)  (W_c: not given)
Other formats (uniform grids, SpQR, SLiM, ...) get "<name>.weight", the gradient
with respect to the dequantized weight Ŵ itself, which is where their chain
rule would start.

The block-level form (fine-tuning one decoder layer):
    P = layer_params(layer)                                 # name -> array
    y, saved = layer_forward(P, cfg, x, pos)
    dx, dP = layer_backward(P, cfg, saved, dy)
and block_mse_and_grads(P, cfg, x, pos, target) for the loss mean((y − target)²).
"""
import math

import numpy as np

from .model import Linear, LINEAR_NAMES, rope_cos_sin, rope_inv_freq


# ===========================================================================
# the operations, each forward beside its backward
# ===========================================================================

# ---- embedding --------------------------------------------------------------
def embedding_forward(E, ids):
    """h_t = E[ids_t].  E (V, d), ids (T,) -> h (T, d)."""
    return E[ids]


def embedding_backward(dh, ids, V):
    """dE[v] = Σ_{t : ids_t = v} dh_t  (the rows of tokens seen, summed).  -> (V, d)."""
    dE = np.zeros((V, dh.shape[1]), dtype=dh.dtype)
    np.add.at(dE, ids, dh)
    return dE


# ---- RMSNorm ----------------------------------------------------------------
def rms_norm_forward(x, w, eps):
    """y = w ⊙ x / s,  s = sqrt(mean_j x_j² + eps), per row.  x (T, d), w (d,).

    Same operations in the same order as llama_np.model.rms_norm.
    -> y (T, d), s (T, 1).
    """
    s = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))
    return (x / s) * w, s


def rms_norm_backward(dy, x, s, w):
    """With x̂ = x / s and u = dy ⊙ w (per row; d = row length):

        dw  = Σ_t dy_t ⊙ x̂_t
        dx  = (u − x̂ · mean_j(u_j x̂_j)) / s

    (∂s/∂x_j = x_j / (d s), so ∂y_i/∂x_j = w_i (δ_ij − x̂_i x̂_j / d) / s.)
    -> dx (T, d), dw (d,).
    """
    xh = x / s
    dw = np.sum(dy * xh, axis=0)
    u = dy * w
    dx = (u - xh * np.mean(u * xh, axis=-1, keepdims=True)) / s
    return dx, dw


# ---- linear (optional bias) -------------------------------------------------
def linear_forward(x, W, b=None):
    """y = x Wᵀ (+ b).  x (T, in), W (out, in), b (out,) -> y (T, out)."""
    y = x @ W.T
    return y if b is None else y + b


def linear_backward(dy, x, W, has_bias=False):
    """dx = dy W,  dW = dyᵀ x,  db = Σ_t dy_t.  -> dx (T, in), dW (out, in), db (out,) or None."""
    dx = dy @ W
    dW = dy.T @ x
    db = dy.sum(axis=0) if has_bias else None
    return dx, dW, db


# ---- RoPE -------------------------------------------------------------------
def rotate_half(x):
    """R x = (−x₂, x₁) with x = (x₁, x₂) the two halves of the last axis."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_half_transposed(z):
    """Rᵀ z = (z₂, −z₁): the transpose (= inverse) of rotate_half."""
    half = z.shape[-1] // 2
    return np.concatenate([z[..., half:], -z[..., :half]], axis=-1)


def rope_forward(x, cos, sin):
    """y = x ⊙ cos + (R x) ⊙ sin, per position.  x (T, heads, hd); cos, sin (T, hd)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rope_backward(dy, cos, sin):
    """y is linear in x:  dx = dy ⊙ cos + Rᵀ (dy ⊙ sin)."""
    return dy * cos[:, None, :] + rotate_half_transposed(dy * sin[:, None, :])


# ---- causal grouped-query softmax attention ---------------------------------
def attention_forward(q, k, v, nkv):
    """Per head, o = P v with P = softmax(q kᵀ / √hd + causal mask) over keys.

    q (T, nh, hd), k and v (T, nkv, hd): query head j reads key/value head
    j // (nh / nkv).  -> o (T, nh*hd), P (nkv, rep, T, T) (saved: the backward
    needs it; rows sum to 1, zero above the diagonal).
    """
    T, nh, hd = q.shape
    rep = nh // nkv
    qg = np.ascontiguousarray(q.reshape(T, nkv, rep, hd).transpose(1, 2, 0, 3))  # (nkv, rep, T, hd)
    kg = np.ascontiguousarray(k.transpose(1, 2, 0))                  # (nkv, hd, T)
    vg = np.ascontiguousarray(v.transpose(1, 0, 2))                  # (nkv, T, hd)
    scores = qg @ kg[:, None]                                        # (nkv, rep, T, T)
    scores *= q.dtype.type(1.0 / math.sqrt(hd))
    masked = np.arange(T)[None, :] > np.arange(T)[:, None]           # key s > query t
    scores += np.where(masked, q.dtype.type(-np.inf), q.dtype.type(0.0))
    scores -= scores.max(axis=-1, keepdims=True)
    P = np.exp(scores, out=scores)
    P /= P.sum(axis=-1, keepdims=True)
    o = (P @ vg[:, None]).transpose(2, 0, 1, 3).reshape(T, nh * hd)  # (T, nh*hd)
    return o, P


def attention_backward(do, q, k, v, P):
    """With S = q kᵀ / √hd, P = softmax(S) (row-wise, masked entries 0), o = P v:

        dv = Pᵀ do                 (summed over the query heads sharing v)
        dP = do vᵀ
        dS = P ⊙ (dP − rowsum(dP ⊙ P))      (softmax backward; 0 where masked)
        dq = dS k / √hd,   dk = dSᵀ q / √hd  (summed over the query heads sharing k)

    do (T, nh*hd) -> dq (T, nh, hd), dk, dv (T, nkv, hd).
    """
    T, nh, hd = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    dog = np.ascontiguousarray(do.reshape(T, nkv, rep, hd).transpose(1, 2, 0, 3))  # (nkv, rep, T, hd)
    qg = np.ascontiguousarray(q.reshape(T, nkv, rep, hd).transpose(1, 2, 0, 3))    # (nkv, rep, T, hd)
    kg = np.ascontiguousarray(k.transpose(1, 0, 2))                  # (nkv, T, hd)
    vg = np.ascontiguousarray(v.transpose(1, 0, 2))                  # (nkv, T, hd)
    dv = (P.transpose(0, 1, 3, 2) @ dog).sum(axis=1)                 # (nkv, T, hd)
    dS = dog @ vg.transpose(0, 2, 1)[:, None]                        # dP (nkv, rep, T, T)
    dS -= np.sum(dS * P, axis=-1, keepdims=True)
    dS *= P
    dS *= q.dtype.type(1.0 / math.sqrt(hd))
    dq = dS @ kg[:, None]                                            # (nkv, rep, T, hd)
    dk = (dS.transpose(0, 1, 3, 2) @ qg).sum(axis=1)                 # (nkv, T, hd)
    return (dq.transpose(2, 0, 1, 3).reshape(T, nh, hd),
            dk.transpose(1, 0, 2), dv.transpose(1, 0, 2))


# ---- SwiGLU -----------------------------------------------------------------
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def swiglu_forward(a, u):
    """g = silu(a) ⊙ u,  silu(a) = a σ(a).  a, u (T, ff)."""
    return a / (a.dtype.type(1.0) + np.exp(-a)) * u


def swiglu_backward(dg, a, u):
    """da = dg ⊙ u ⊙ σ(a) (1 + a (1 − σ(a))),   du = dg ⊙ silu(a)."""
    sg = sigmoid(a)
    return dg * u * sg * (1 + a * (1 - sg)), dg * (a * sg)


# ---- cross-entropy ----------------------------------------------------------
def cross_entropy_forward_backward(logits, targets):
    """loss = mean_t (logsumexp(z_t) − z_t[y_t]);  dz_t = (softmax(z_t) − onehot(y_t)) / N.

    logits (N, V) (overwritten by dz, to spare a (N, V) copy), targets (N,).
    -> (loss float, dz (N, V)).  Sums in float64 for the loss, as perplexity.
    """
    N = logits.shape[0]
    z_y = logits[np.arange(N), targets].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    m = z_y - logits[np.arange(N), targets]                          # the subtracted max
    p = np.exp(logits, out=logits)
    total = p.sum(axis=-1, dtype=np.float64)                         # (N,)
    loss = float(np.mean(m + np.log(total) - z_y))
    p /= total[:, None].astype(p.dtype)                              # softmax
    p[np.arange(N), targets] -= 1
    p *= p.dtype.type(1.0 / N)
    return loss, p


# ===========================================================================
# one decoder layer
# ===========================================================================
def layer_params(layer, dtype=np.float32):
    """The parameters of a DecoderLayer as {name relative to the layer: array of dtype}.

    Linear weights: the dense weight, or a quantized one's dequantization Ŵ.
    """
    P = {"input_layernorm.weight": layer.input_norm,
         "post_attention_layernorm.weight": layer.post_norm}
    for n, lin in layer.linears.items():
        P[n + ".weight"] = lin.weight if isinstance(lin, Linear) else lin.dequantize()
    for n, b in layer.biases.items():
        P[n + ".bias"] = b
    return {k: np.asarray(v, dtype=dtype) for k, v in P.items()}


def layer_forward(P, cfg, x, pos):
    """One decoder layer (as DecoderLayer.forward), keeping what the backward needs.

    P: layer_params; x (T, d); pos (T,) positions 0..T-1 (no cache).
    -> y (T, d), saved (dict of activations).
    """
    T = x.shape[0]
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    b = lambda n: P.get(n + ".bias")                                 # noqa: E731
    W = lambda n: P[n + ".weight"]                                   # noqa: E731
    cos, sin = (c.astype(x.dtype) for c in rope_cos_sin(rope_inv_freq(cfg), np.asarray(pos)))
    # attention
    a, s1 = rms_norm_forward(x, P["input_layernorm.weight"], eps)    # (T, d)
    q0 = linear_forward(a, W("self_attn.q_proj"), b("self_attn.q_proj")).reshape(T, nh, hd)
    k0 = linear_forward(a, W("self_attn.k_proj"), b("self_attn.k_proj")).reshape(T, nkv, hd)
    v = linear_forward(a, W("self_attn.v_proj"), b("self_attn.v_proj")).reshape(T, nkv, hd)
    q, k = rope_forward(q0, cos, sin), rope_forward(k0, cos, sin)
    o, Patt = attention_forward(q, k, v, nkv)                        # (T, nh*hd)
    h = x + linear_forward(o, W("self_attn.o_proj"))                 # residual
    # SwiGLU MLP
    m, s2 = rms_norm_forward(h, P["post_attention_layernorm.weight"], eps)
    ga = linear_forward(m, W("mlp.gate_proj"))                       # (T, ff)
    up = linear_forward(m, W("mlp.up_proj"))                         # (T, ff)
    g = swiglu_forward(ga, up)
    y = h + linear_forward(g, W("mlp.down_proj"))                    # residual
    saved = dict(x=x, a=a, s1=s1, q=q, k=k, v=v, P=Patt, o=o, h=h, m=m, s2=s2,
                 ga=ga, up=up, g=g, cos=cos, sin=sin)
    return y, saved


def layer_backward(P, cfg, saved, dy):
    """The layer's ops in reverse.  dy (T, d) = dloss/dy.

    -> dx (T, d), grads {name relative to the layer: gradient, shape of P[name]}.
    """
    S = saved
    T = dy.shape[0]
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    W = lambda n: P[n + ".weight"]                                   # noqa: E731
    grads = {}
    # y = h + g Wdᵀ
    dh = dy.copy()
    dg, grads["mlp.down_proj.weight"], _ = linear_backward(dy, S["g"], W("mlp.down_proj"))
    dga, dup = swiglu_backward(dg, S["ga"], S["up"])
    dm, grads["mlp.gate_proj.weight"], _ = linear_backward(dga, S["m"], W("mlp.gate_proj"))
    dm2, grads["mlp.up_proj.weight"], _ = linear_backward(dup, S["m"], W("mlp.up_proj"))
    dm += dm2
    dh2, grads["post_attention_layernorm.weight"] = rms_norm_backward(
        dm, S["h"], S["s2"], P["post_attention_layernorm.weight"])
    dh += dh2
    # h = x + o Woᵀ
    dx = dh.copy()
    do, grads["self_attn.o_proj.weight"], _ = linear_backward(dh, S["o"], W("self_attn.o_proj"))
    dq, dk, dv = attention_backward(do, S["q"], S["k"], S["v"], S["P"])
    dq = rope_backward(dq, S["cos"], S["sin"]).reshape(T, nh * hd)
    dk = rope_backward(dk, S["cos"], S["sin"]).reshape(T, nkv * hd)
    dv = dv.reshape(T, nkv * hd)
    da = 0
    for n, d in (("self_attn.q_proj", dq), ("self_attn.k_proj", dk), ("self_attn.v_proj", dv)):
        has_b = n + ".bias" in P
        dan, grads[n + ".weight"], db = linear_backward(d, S["a"], W(n), has_b)
        if has_b:
            grads[n + ".bias"] = db
        da = da + dan
    dx2, grads["input_layernorm.weight"] = rms_norm_backward(
        da, S["x"], S["s1"], P["input_layernorm.weight"])
    dx += dx2
    return dx, grads


def block_mse_and_grads(P, cfg, x, pos, target):
    """loss = mean((y − target)²) over all entries of the layer output y (T, d).

    dloss/dy = 2 (y − target) / y.size.  -> (loss, dx (T, d), grads).
    """
    y, saved = layer_forward(P, cfg, x, pos)
    r = y - target
    loss = float(np.mean(r.astype(np.float64) ** 2))
    dx, grads = layer_backward(P, cfg, saved, r * r.dtype.type(2.0 / r.size))
    return loss, dx, grads


# ===========================================================================
# packed checkpoints: from dloss/dŴ to the stored continuous fields
# ===========================================================================
def additive_grads(codes, C, s, dW):
    """Ŵ[i, kg + a] = s_i z_i[kg + a],  z_i[kg + a] = Σ_m C_m[b_ikm][a]:

        ds_i          = Σ_j dŴ_ij z_ij
        dC_m[c][a]    = Σ_{(i, k) : b_ikm = c} s_i dŴ[i, kg + a]

    codes (out, K, M) ints, C (M, 2^B, g), s (out,), dW (out, in)
    -> dC (M, 2^B, g), ds (out,), in dW's dtype.
    """
    out, n = dW.shape
    M, nc, g = C.shape
    codes = np.asarray(codes, dtype=np.int64)
    C, s = C.astype(dW.dtype, copy=False), s.astype(dW.dtype, copy=False)
    Z = C[0][codes[:, :, 0]]                                         # (out, K, g)
    for m in range(1, M):
        Z = Z + C[m][codes[:, :, m]]
    dZ = (s[:, None] * dW).reshape(-1, g)                            # (out*K, g)
    dC = np.empty((M, nc, g), dtype=dW.dtype)
    for m in range(M):
        idx = codes[:, :, m].reshape(-1)
        for a in range(g):
            dC[m, :, a] = np.bincount(idx, weights=dZ[:, a], minlength=nc)
    return dC, np.einsum("ij,ij->i", dW, Z.reshape(out, n))


def additive_field_grads(q, dW):
    """The additive (AQLM) format's stored fields: see additive_grads."""
    dC, ds = additive_grads(q.codes, q.codebooks, q.scales, dW)
    return {"codebooks": dC, "scales": ds}


def row_lut_field_grads(q, dW):
    """Ŵ[r, c] = lut[r, code_rc] + S[r, c]:  dlut[r, v] = Σ_{c : code_rc = v} dŴ_rc."""
    from refq.formats.packing import unpack
    out, n = q.shape
    k = 2 ** q.bits
    codes = unpack(q.qweight, q.bits, n).astype(np.int64)           # (out, in)
    idx = (np.arange(out)[:, None] * k + codes).reshape(-1)
    dlut = np.bincount(idx, weights=dW.reshape(-1), minlength=out * k).reshape(out, k)
    return {"lut": dlut.astype(dW.dtype)}


def lowrank_grads(L, R, dW):
    """Ŵ = W_c + L R:  dL = dŴ Rᵀ (out, r),  dR = Lᵀ dŴ (r, in)  (W_c fixed)."""
    return dW @ R.T, L.T @ dW


def slim_field_grads(q, dW):
    """Ŵ = W_c + L R (float16 adapters): see lowrank_grads  (W_c: not given).

    None (no rule) when the adapters are absent or stored quantized."""
    if not q.rank or q.adapter_bits is not None:
        return None
    L, R = (a.astype(dW.dtype) for a in q.adapters())              # (out, r), (r, in)
    dL, dR = lowrank_grads(L, R, dW)
    return {"lora_L": dL, "lora_R": dR}


# format name -> fn(quantized weight, dloss/dŴ (out, in)) -> {stored field: gradient}, or
# None where the format's fields are not continuous (then dloss/dŴ is given)
FIELD_GRADS = {"additive": additive_field_grads, "row_lut": row_lut_field_grads,
               "slim": slim_field_grads}


def linear_grads(lin, name, dW):
    """{tensor name: gradient} for the linear `lin` stored under `name` (full name)."""
    if isinstance(lin, Linear):
        return {name + ".weight": dW}
    rule = FIELD_GRADS.get(getattr(lin, "FORMAT", None))
    fields = rule(lin, dW) if rule is not None else None
    if fields is None:
        return {name + ".weight": dW}                                # dloss/dŴ itself
    return {f"{name}.{f}": g for f, g in fields.items()}


# ===========================================================================
# the whole model
# ===========================================================================
def loss_and_grads(model, ids, dtype=np.float32, on_grad=None):
    """Mean next-token NLL of one window and its gradient (see the module docstring).

    model: llama_np.Llama (HF folder or refq packed checkpoint); ids (T,), T >= 2.
    on_grad(name, gradient): when given, each gradient is handed over as soon as
    it is complete (last layer first) and not kept, so that memory stays at one
    window's activations plus one layer's gradients; grads is then {}.
    -> (loss float, grads {tensor name: array of dtype}).
    """
    cfg = model.cfg
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) < 2:
        raise ValueError(f"loss_and_grads needs a window of >= 2 tokens, got {len(ids)}")
    inp, targets = ids[:-1], ids[1:]
    pos = np.arange(len(inp))
    grads = {}
    emit = on_grad or grads.__setitem__
    E = np.asarray(model.embed_tokens, dtype=dtype)                  # (V, d)
    w_final = np.asarray(model.norm, dtype=dtype)                    # (d,)
    tied = cfg.tie_word_embeddings
    W_head = E if tied else np.asarray(model.lm_head.weight, dtype=dtype)   # (V, d)

    # ---- forward, keeping each layer's activations ----
    h = embedding_forward(E, inp)                                    # (T-1, d)
    saved = []
    for layer in model.layers:
        h, s = layer_forward(layer_params(layer, dtype), cfg, h, pos)
        saved.append(s)
    n, s_final = rms_norm_forward(h, w_final, cfg.rms_norm_eps)      # (T-1, d)
    logits = linear_forward(n, W_head)                               # (T-1, V)
    loss, dlogits = cross_entropy_forward_backward(logits, targets)
    del logits

    # ---- backward ----
    dn, dW_head, _ = linear_backward(dlogits, n, W_head)
    del dlogits
    dh, dw_final = rms_norm_backward(dn, h, s_final, w_final)
    emit("model.norm.weight", dw_final)
    if not tied:
        emit("lm_head.weight", dW_head)
        dW_head = None
    for i in reversed(range(len(model.layers))):
        layer = model.layers[i]
        dh, g = layer_backward(layer_params(layer, dtype), cfg, saved[i], dh)
        saved[i] = None                                              # free this layer's activations
        pre = f"model.layers.{i}."
        for rel, grad in g.items():
            lin = rel.rsplit(".", 1)[0]                              # e.g. "mlp.up_proj"
            if lin in LINEAR_NAMES and rel.endswith(".weight"):      # through Ŵ's stored fields
                for k, v in linear_grads(layer.linears[lin], pre + lin, grad).items():
                    emit(k, v)
            else:                                                    # norms, biases
                emit(pre + rel, grad)
    dE = embedding_backward(dh, inp, cfg.vocab_size)
    if tied:
        dE += dW_head
    emit("model.embed_tokens.weight", dE)
    return loss, grads
