"""llama_np.backward against central finite differences (float64), op by op and whole.

The independent truth is the definition of the derivative: for a scalar
f(θ) = Σ R ⊙ op(θ) (R a fixed random array), (f(θ + ε e_i) − f(θ − ε e_i)) / 2ε
must match the analytic gradient at every coordinate i (ε = 1e-6, float64:
truncation error ~ε², rounding ~1e-16/ε; both far below the 1e-6 asked for).
The forward that the backward differentiates is checked against
llama_np.model's forward separately.
"""
import numpy as np
import pytest

from llama_np import LlamaConfig, Llama, loss_and_grads
from llama_np import backward as B
from llama_np.generate import log_softmax_nll
from llama_np.model import Linear, rope_cos_sin, rope_inv_freq

EPS = 1e-6
TOL = 1e-6
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def rel_err(ana, num):
    """max |ana − num| / max |num| (the scale of the gradient)."""
    return float(np.max(np.abs(ana - num)) / max(float(np.max(np.abs(num))), 1e-300))


def numgrad(f, x, idx=None):
    """Central differences of the scalar f() w.r.t. x (perturbed in place) at the flat
    indices idx (all when None) -> array of those partial derivatives."""
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    out = []
    for i in idx:
        old = flat[i]
        flat[i] = old + EPS
        fp = f()
        flat[i] = old - EPS
        fm = f()
        flat[i] = old
        out.append((fp - fm) / (2 * EPS))
    return np.array(out)


def tiny_config(bias=False, nkv=2, tied=False, scaling=None, layers=2):
    return LlamaConfig.from_dict(dict(
        vocab_size=19, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=nkv, attention_bias=bias,
        tie_word_embeddings=tied, rope_scaling=scaling, rope_theta=100.0, rms_norm_eps=1e-5))


def tiny_model(cfg, dtype=np.float64, seed=0):
    """A Llama with random weights of `dtype` (float64 for finite differences)."""
    rng = np.random.default_rng(seed)

    def get(name, shape):
        if name.endswith("norm.weight"):
            return (1 + 0.3 * rng.standard_normal(shape)).astype(dtype)
        if name.endswith(".bias"):
            return (0.3 * rng.standard_normal(shape)).astype(dtype)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype) * (
            3.0 if "embed" in name else 1.0)
    return Llama(cfg, get)


def model_params(model):
    """{HF name: the model's own array} (perturbing it perturbs the model)."""
    P = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm}
    if not model.cfg.tie_word_embeddings:
        P["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        P[pre + "input_layernorm.weight"] = layer.input_norm
        P[pre + "post_attention_layernorm.weight"] = layer.post_norm
        for n, lin in layer.linears.items():
            P[pre + n + ".weight"] = lin.weight
        for n, b in layer.biases.items():
            P[pre + n + ".bias"] = b
    return P


VARIANTS = {
    "plain-gqa": dict(),
    "bias": dict(bias=True),
    "mha": dict(nkv=4),
    "mqa-bias-tied": dict(nkv=1, bias=True, tied=True),
    "tied": dict(tied=True),
    "rope-linear": dict(scaling={"rope_type": "linear", "factor": 4.0}),
    "rope-llama3": dict(scaling=LLAMA3, bias=True),
}


# ---------------------------------------------------------------------------
# each op
# ---------------------------------------------------------------------------
def check_op(forward, backward_grads, inputs, seed=1):
    """forward(*inputs) -> y; backward_grads(dy) -> list of gradients (one per input)."""
    rng = np.random.default_rng(seed)
    y = forward(*inputs)
    R = rng.standard_normal(y.shape)
    ana = backward_grads(R)
    for x, g in zip(inputs, ana):
        num = numgrad(lambda: float(np.sum(R * forward(*inputs))), x).reshape(x.shape)
        assert g.shape == x.shape
        assert rel_err(g, num) <= TOL, rel_err(g, num)


def test_embedding():
    rng = np.random.default_rng(0)
    E = rng.standard_normal((7, 5))
    ids = np.array([3, 1, 3, 6, 3, 0])                               # repeats sum
    R = rng.standard_normal((6, 5))
    num = numgrad(lambda: float(np.sum(R * B.embedding_forward(E, ids))), E).reshape(E.shape)
    assert rel_err(B.embedding_backward(R, ids, 7), num) <= TOL


def test_rms_norm():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 8)), 1 + rng.standard_normal(8)
    check_op(lambda x, w: B.rms_norm_forward(x, w, 1e-5)[0],
             lambda dy: B.rms_norm_backward(dy, x, B.rms_norm_forward(x, w, 1e-5)[1], w), [x, w])


@pytest.mark.parametrize("bias", [False, True])
def test_linear(bias):
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((5, 6)), rng.standard_normal((4, 6))
    inputs = [x, W] + ([rng.standard_normal(4)] if bias else [])
    grads = lambda dy: [g for g in B.linear_backward(dy, x, W, bias) if g is not None]  # noqa
    check_op(lambda x, W, *b: B.linear_forward(x, W, *b), grads, inputs)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rope(scaling):
    cfg = tiny_config(scaling=scaling)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), np.arange(6))
    cos, sin = cos.astype(np.float64), sin.astype(np.float64)
    x = np.random.default_rng(0).standard_normal((6, 3, cfg.head_dim))
    check_op(lambda x: B.rope_forward(x, cos, sin), lambda dy: [B.rope_backward(dy, cos, sin)], [x])


@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (4, 1)])
def test_attention(nh, nkv):
    rng = np.random.default_rng(0)
    T, hd = 5, 4
    q, k, v = (rng.standard_normal((T, n, hd)) for n in (nh, nkv, nkv))

    def grads(do):
        _, P = B.attention_forward(q, k, v, nkv)
        return B.attention_backward(do, q, k, v, P)
    check_op(lambda q, k, v: B.attention_forward(q, k, v, nkv)[0], grads, [q, k, v])


def test_attention_is_causal_softmax():
    """Against a per-head loop written from the definition."""
    rng = np.random.default_rng(0)
    T, nh, nkv, hd = 6, 4, 2, 3
    q, k, v = (rng.standard_normal((T, n, hd)) for n in (nh, nkv, nkv))
    o, _ = B.attention_forward(q, k, v, nkv)
    for j in range(nh):
        kv = j // (nh // nkv)
        for t in range(T):
            s = k[:t + 1, kv] @ q[t, j] / np.sqrt(hd)
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(o[t, j * hd:(j + 1) * hd], p @ v[:t + 1, kv], rtol=1e-12)


def test_swiglu():
    rng = np.random.default_rng(0)
    a, u = 3 * rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    check_op(B.swiglu_forward, lambda dg: B.swiglu_backward(dg, a, u), [a, u])


def test_cross_entropy():
    rng = np.random.default_rng(0)
    z, y = 3 * rng.standard_normal((5, 7)), np.array([0, 6, 2, 2, 3])
    f = lambda: float(np.mean(log_softmax_nll(z, y)))               # noqa: E731 (independent)
    loss, dz = B.cross_entropy_forward_backward(z.copy(), y)
    assert abs(loss - f()) <= 1e-12 * abs(f())
    assert rel_err(dz, numgrad(f, z).reshape(z.shape)) <= TOL


# ---------------------------------------------------------------------------
# one decoder layer, and the block MSE
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain-gqa", "bias", "mqa-bias-tied", "rope-llama3"])
def test_layer_backward(variant):
    cfg = tiny_config(**VARIANTS[variant], layers=1)
    model = tiny_model(cfg)
    P = B.layer_params(model.layers[0], np.float64)
    rng = np.random.default_rng(2)
    T = 5
    x, target = rng.standard_normal((T, 16)), rng.standard_normal((T, 16))
    pos = np.arange(T)
    loss, dx, grads = B.block_mse_and_grads(P, cfg, x, pos, target)
    f = lambda: B.block_mse_and_grads(P, cfg, x, pos, target)[0]   # noqa: E731
    assert rel_err(dx, numgrad(f, x).reshape(x.shape)) <= TOL
    assert set(grads) == set(P)
    for name, p in P.items():
        assert rel_err(grads[name], numgrad(f, p).reshape(p.shape)) <= TOL, name


def test_layer_forward_matches_model(tmp_path):
    """layer_forward (float32) is DecoderLayer.forward."""
    cfg = tiny_config(bias=True, scaling=LLAMA3, layers=1)
    model = tiny_model(cfg, np.float32)
    x = np.random.default_rng(3).standard_normal((7, 16)).astype(np.float32)
    y, _ = B.layer_forward(B.layer_params(model.layers[0]), cfg, x, np.arange(7))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, model.layers[0].forward(x, np.arange(7)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_and_grads_finite_differences(variant):
    cfg = tiny_config(**VARIANTS[variant])
    model = tiny_model(cfg)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, 9)
    ids[3] = ids[6]                                                  # a repeated token
    loss, grads = loss_and_grads(model, ids, dtype=np.float64)
    params = model_params(model)
    assert set(grads) == set(params)
    f = lambda: loss_and_grads(model, ids, dtype=np.float64)[0]     # noqa: E731
    rng = np.random.default_rng(5)
    for name, p in params.items():
        assert grads[name].shape == p.shape and grads[name].dtype == np.float64
        idx = rng.choice(p.size, size=min(p.size, 6), replace=False)
        if name == "model.embed_tokens.weight":                     # rows of tokens read, too
            idx = np.concatenate([idx, ids[:3] * p.shape[1] + 1])
        num = numgrad(f, p, idx)
        ana = grads[name].reshape(-1)[idx]
        err = np.max(np.abs(ana - num)) / max(np.max(np.abs(grads[name])), 1e-300)
        assert err <= TOL, (name, err)


@pytest.mark.parametrize("variant", ["bias", "mqa-bias-tied", "rope-llama3"])
def test_loss_is_model_forward_nll(variant):
    """float32 loss = mean of perplexity's per-token NLL on model.forward(ids[:-1])."""
    cfg = tiny_config(**VARIANTS[variant])
    model = tiny_model(cfg, np.float32)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, 12)
    loss, grads = loss_and_grads(model, ids)
    ref = float(np.mean(log_softmax_nll(model.forward(ids[:-1]), ids[1:])))
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    assert all(g.dtype == np.float32 for g in grads.values())
    loss64, grads64 = loss_and_grads(model, ids, dtype=np.float64)
    for k in grads:
        assert np.linalg.norm(grads[k] - grads64[k]) <= 1e-4 * np.linalg.norm(grads64[k]), k


def test_on_grad_streams_the_same_gradients():
    cfg = tiny_config(bias=True)
    model = tiny_model(cfg)
    ids = np.arange(8) % cfg.vocab_size
    loss, grads = loss_and_grads(model, ids, dtype=np.float64)
    seen = {}
    loss2, empty = loss_and_grads(model, ids, dtype=np.float64, on_grad=seen.__setitem__)
    assert empty == {} and loss2 == loss and set(seen) == set(grads)
    for k in grads:
        np.testing.assert_array_equal(seen[k], grads[k])


def test_window_too_short():
    model = tiny_model(tiny_config())
    with pytest.raises(ValueError):
        loss_and_grads(model, [3])


# ---------------------------------------------------------------------------
# packed weights: through the dequantization to the stored fields
# ---------------------------------------------------------------------------
def additive_weight(out=6, n=16, M=2, nbits=3, g=4, seed=0):
    from refq.formats.additive import AdditiveWeight
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2 ** nbits, (out, n // g, M))
    return AdditiveWeight.from_arrays(codes, rng.standard_normal((M, 2 ** nbits, g)),
                                      0.5 + rng.random(out), nbits)


def test_additive_field_grads_finite_differences():
    """Ŵ(C, s) from the format's definition in float64; f = Σ dW ⊙ Ŵ."""
    q = additive_weight()
    out, n = q.shape
    g = q.in_group_size
    C = q.codebooks.astype(np.float64)
    s = q.scales.astype(np.float64)
    codes = q.codes.astype(np.int64)

    def What():
        W = np.zeros((out, n))
        for i in range(out):
            for k in range(n // g):
                W[i, k * g:(k + 1) * g] = s[i] * sum(C[m, codes[i, k, m]] for m in range(C.shape[0]))
        return W
    np.testing.assert_allclose(What(), q.dequantize(), rtol=1e-6)
    dW = np.random.default_rng(1).standard_normal((out, n))
    f = lambda: float(np.sum(dW * What()))                          # noqa: E731
    got = B.additive_field_grads(q, dW)
    assert rel_err(got["codebooks"], numgrad(f, C).reshape(C.shape)) <= TOL
    assert rel_err(got["scales"], numgrad(f, s)) <= TOL


def test_row_lut_field_grads_finite_differences():
    from refq.formats.row_lut import RowLutWeight
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, (5, 12))
    lut = np.sort(rng.standard_normal((5, 8)), axis=1)
    S = np.where(rng.random((5, 12)) < 0.1, rng.standard_normal((5, 12)), 0.0)
    q = RowLutWeight.from_codes(codes, lut, 3, S=S)
    L = q.lut.astype(np.float64)
    Sd = q.dequantize().astype(np.float64) - np.take_along_axis(L, codes, 1)   # the outliers
    dW = rng.standard_normal((5, 12))
    f = lambda: float(np.sum(dW * (np.take_along_axis(L, codes, 1) + Sd)))  # noqa: E731
    assert rel_err(B.row_lut_field_grads(q, dW)["lut"], numgrad(f, L).reshape(L.shape)) <= TOL


def test_slim_adapter_grads_finite_differences():
    from refq.api import quantize_weight
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 16)).astype(np.float32)
    q = quantize_weight(W, np.eye(16), "slim", rank=3)              # 2:4 + 4-bit + fp16 adapters
    L, R = (a.astype(np.float64) for a in q.adapters())
    Wc = q.dequantize().astype(np.float64) - L @ R                  # the compressed base
    dW = rng.standard_normal((8, 16))
    f = lambda: float(np.sum(dW * (Wc + L @ R)))                    # noqa: E731
    got = B.slim_field_grads(q, dW)
    assert rel_err(got["lora_L"], numgrad(f, L).reshape(L.shape)) <= TOL
    assert rel_err(got["lora_R"], numgrad(f, R).reshape(R.shape)) <= TOL
    q4 = quantize_weight(W, np.eye(16), "slim", rank=3, adapter_bits=4, adapter_group_size=8)
    assert B.linear_grads(q4, "x", dW) == {"x.weight": dW}          # quantized adapters: dŴ


def test_packed_model_gradients_go_to_stored_fields():
    """A model with one additive linear: its codebooks/scales gradients are the chain rule
    applied to the dense gradient of the same (dequantized) weight; other names unchanged."""
    cfg = tiny_config(layers=1)
    dense = tiny_model(cfg, np.float32)
    packed = tiny_model(cfg, np.float32)
    q = additive_weight(out=24, n=16)
    packed.layers[0].linears["mlp.up_proj"] = q
    dense.layers[0].linears["mlp.up_proj"] = Linear(q.dequantize())
    ids = np.arange(10) % cfg.vocab_size
    l1, g1 = loss_and_grads(packed, ids)
    l2, g2 = loss_and_grads(dense, ids)
    assert l1 == pytest.approx(l2, rel=1e-6)
    name = "model.layers.0.mlp.up_proj"
    assert name + ".weight" not in g1 and name + ".codebooks" in g1 and name + ".scales" in g1
    want = B.additive_field_grads(q, g2[name + ".weight"])
    for f in ("codebooks", "scales"):
        np.testing.assert_allclose(g1[f"{name}.{f}"], want[f], rtol=1e-5, atol=1e-7)
    assert set(g1) - {name + ".codebooks", name + ".scales"} == set(g2) - {name + ".weight"}


# ---------------------------------------------------------------------------
# SmolLM2: float32 against the float64 mode
# ---------------------------------------------------------------------------
def test_smollm2_float32_vs_float64(smollm2_path):
    from llama_np import Tokenizer, load_model
    model = load_model(smollm2_path)
    ids = Tokenizer(smollm2_path).encode("The quick brown fox jumps over the lazy dog. " * 3)[:24]
    loss32, g32 = loss_and_grads(model, ids)
    worst = {}

    def compare(name, g):
        a = g32.pop(name)
        worst[name] = float(np.linalg.norm(a - g) / np.linalg.norm(g))
    loss64, _ = loss_and_grads(model, ids, dtype=np.float64, on_grad=compare)
    assert abs(loss32 - loss64) <= 1e-5 * loss64
    assert not g32 and len(worst) == 2 + 9 * model.cfg.num_hidden_layers  # tied: no lm_head
    bad = {k: v for k, v in worst.items() if not v <= 1e-4}
    assert not bad, bad
