"""llama_np's forward pass against an independent float64 reference.

The reference below is written from the model's definition, not from
llama_np: plain loops over positions and heads, RoPE as a rotation of the
pairs (x_i, x_{i+hd/2}) (HF's rotate_half layout), a softmax per row,
grouped-query attention by mapping query head h to kv head h // (heads/kv_heads),
"linear" scaling as positions / factor and "llama3" as in the Llama 3.1 code
(per-frequency: keep high frequencies, divide low ones by factor, blend the
middle). It reads config.json itself.
"""
import json
import math
import os

import numpy as np
import pytest

from conftest import write_tiny_checkpoint
from llama_np import LINEAR_GROUPS, generate, load_model, perplexity, sample_next

TOL = 1e-4      # fp32 implementation vs fp64 reference, logits of magnitude ~5


# =========================================================================== reference
def ref_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    heads = c["num_attention_heads"]
    rp = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling")
    if scaling is None and rp.get("rope_type", "default") != "default":
        scaling = rp
    return dict(
        d=c["hidden_size"], L=c["num_hidden_layers"], heads=heads,
        kv=c.get("num_key_value_heads", heads),
        hd=c.get("head_dim") or c["hidden_size"] // heads,
        theta=c.get("rope_theta", rp.get("rope_theta", 10000.0)),
        scaling=scaling, eps=c.get("rms_norm_eps", 1e-6),
        bias=c.get("attention_bias", c["model_type"] == "qwen2"),
        tie=c.get("tie_word_embeddings", False),
    )


def ref_freqs(c):
    """[(frequency, position divisor)] for i < hd/2, Llama 3.1 style scaling."""
    hd, theta, sc = c["hd"], float(c["theta"]), c["scaling"]
    freqs = [theta ** (-(2.0 * i) / hd) for i in range(hd // 2)]
    if sc is None:
        return freqs, 1.0
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return freqs, float(sc["factor"])            # positions / factor
    assert kind == "llama3"
    factor = sc["factor"]
    low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old = sc.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs:                                  # Meta's apply_scaling, verbatim logic
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out, 1.0


def ref_rope(x, pos, c):
    """x (hd,) at integer position pos: pair (i, i+hd/2) times e^{j·pos'·f_i}."""
    freqs, div = ref_freqs(c)
    half = len(x) // 2
    y = np.empty_like(x)
    for i in range(half):
        z = complex(x[i], x[i + half]) * np.exp(1j * (pos / div) * freqs[i])
        y[i], y[i + half] = z.real, z.imag
    return y


def ref_rms(x, w, eps):
    return np.array([row / math.sqrt(np.mean(row * row) + eps) * w for row in x])


def ref_silu(x):
    return x / (1 + np.exp(-x))


def ref_layer(W, c, i, x, zero=(), scale=None):
    """One decoder layer in float64; returns (out, intermediates).

    zero: linear names whose weight is replaced by 0; scale: {name: s} multiplies a weight.
    """
    p = f"model.layers.{i}."

    def lin(name, a):
        Wt = W[p + name + ".weight"].astype(np.float64)
        if name in zero:
            Wt = 0 * Wt
        if scale and name in scale:
            Wt = scale[name] * Wt
        y = a @ Wt.T
        if c["bias"] and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            y = y + W[p + name + ".bias"]
        return y

    T, hd, H, KV = x.shape[0], c["hd"], c["heads"], c["kv"]
    inter = {}
    a = ref_rms(x, W[p + "input_layernorm.weight"], c["eps"])
    inter["attn_in"] = a
    q = lin("self_attn.q_proj", a).reshape(T, H, hd)
    k = lin("self_attn.k_proj", a).reshape(T, KV, hd)
    v = lin("self_attn.v_proj", a).reshape(T, KV, hd)
    q = np.array([[ref_rope(q[t, h], t, c) for h in range(H)] for t in range(T)])
    k = np.array([[ref_rope(k[t, g], t, c) for g in range(KV)] for t in range(T)])
    o = np.zeros((T, H, hd))
    for h in range(H):
        g = h // (H // KV)
        for t in range(T):
            s = np.array([q[t, h] @ k[u, g] / math.sqrt(hd) for u in range(t + 1)])
            pr = np.exp(s - s.max())
            pr /= pr.sum()
            o[t, h] = sum(pr[u] * v[u, g] for u in range(t + 1))
    o = o.reshape(T, H * hd)
    inter["o_in"] = o
    x = x + lin("self_attn.o_proj", o)
    m = ref_rms(x, W[p + "post_attention_layernorm.weight"], c["eps"])
    inter["mlp_in"] = m
    dn = ref_silu(lin("mlp.gate_proj", m)) * lin("mlp.up_proj", m)
    inter["down_in"] = dn
    return x + lin("mlp.down_proj", dn), inter


def ref_forward(W, c, ids):
    x = W["model.embed_tokens.weight"][np.asarray(ids)].astype(np.float64)
    for i in range(c["L"]):
        x, _ = ref_layer(W, c, i, x)
    head = W["model.embed_tokens.weight" if c["tie"] else "lm_head.weight"]
    return ref_rms(x, W["model.norm.weight"], c["eps"]) @ head.astype(np.float64).T


def ref_nll(logits, targets):
    out = []
    for row, t in zip(logits, targets):
        m = row.max()
        out.append(m + math.log(np.exp(row - m).sum()) - row[t])
    return np.array(out)


def ids_for(n, vocab=64, seed=1):
    return np.random.default_rng(seed).integers(2, vocab, size=n)


# =========================================================================== forward vs reference
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "default": {},
    "qwen2-implied-bias": dict(model_type="qwen2", attention_bias=None),
    "llama-attention-bias": dict(attention_bias=True),
    "mistral": dict(model_type="mistral"),
    "untied-lm-head": dict(tie=False),
    "fp16": dict(dtype="float16"),
    "bf16": dict(dtype="bfloat16"),
    "2-shards": dict(shards=2),
    "3-shards-bf16-untied": dict(shards=3, dtype="bfloat16", tie=False),
    "rope-linear-old-key": dict(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=100.0),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=100.0),
    "rope-llama3": dict(rope_scaling=LLAMA3, rope_theta=100.0),
    "head-dim-16": dict(head_dim=16),
    "head-dim-4": dict(head_dim=4, heads=8, kv_heads=2),
    "mha": dict(kv_heads=4),
    "mqa": dict(kv_heads=1),
    "rope-parameters": dict(rope_parameters_style=True, rope_theta=300.0),
    "rope-parameters-llama3": dict(rope_parameters_style=True, rope_theta=100.0,
                                   rope_scaling=LLAMA3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(tmp_path, case):
    folder = str(tmp_path / case)
    W = write_tiny_checkpoint(folder, **CASES[case])
    c = ref_config(folder)
    model = load_model(folder)
    ids = ids_for(12)
    got = model.forward(ids)
    assert got.dtype == np.float32 and got.shape == (12, 64)
    want = ref_forward(W, c, ids)
    err = np.abs(got - want).max()
    assert err < TOL, f"{case}: max |llama_np - reference| = {err:.3g}"
    assert np.abs(want).max() > 1.0      # the comparison is not between near-zeros


def test_bias_and_qwen2_default_actually_used(tmp_path):
    """qwen2 without attention_bias must load and add the biases."""
    folder = str(tmp_path / "q")
    W = write_tiny_checkpoint(folder, model_type="qwen2", attention_bias=None)
    c = ref_config(folder)
    got = load_model(folder).forward(ids_for(8))
    no_bias = ref_forward(W, dict(c, bias=False), ids_for(8))
    assert np.abs(got - no_bias).max() > 1e-2


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rope_scaling_makes_a_difference(tmp_path, scaling):
    """The scaled cases above would catch an implementation that ignores scaling."""
    folder = str(tmp_path / "r")
    W = write_tiny_checkpoint(folder, rope_scaling=scaling, rope_theta=100.0)
    c = ref_config(folder)
    got = load_model(folder).forward(ids_for(12))
    unscaled = ref_forward(W, dict(c, scaling=None), ids_for(12))
    assert np.abs(got - unscaled).max() > 1e-2


def test_llama3_regimes_all_present():
    """The LLAMA3 test config exercises kept, blended and divided frequencies."""
    c = dict(hd=8, theta=100.0, scaling=LLAMA3)
    base = [100.0 ** (-(2.0 * i) / 8) for i in range(4)]
    scaled, _ = ref_freqs(c)
    ratios = [s / b for s, b in zip(scaled, base)]
    assert ratios[0] == 1.0
    assert any(1 / 8 < r < 1 for r in ratios)
    assert ratios[-1] == pytest.approx(1 / 8)


# =========================================================================== KV cache
@pytest.mark.parametrize("kw", [{}, dict(attention_bias=True, kv_heads=1, rope_scaling=LLAMA3,
                                         rope_theta=100.0)])
def test_kv_cache_matches_full_forward(tmp_path, kw):
    folder = str(tmp_path / "kv")
    write_tiny_checkpoint(folder, **kw)
    model = load_model(folder)
    ids = ids_for(14)
    full = model.forward(ids)
    cache = model.new_cache(len(ids))
    parts = [model.forward(ids[:5], cache=cache)]
    assert cache.length == 5
    parts.append(model.forward(ids[5:8], cache=cache))          # a chunk
    for t in range(8, len(ids)):                                 # then one at a time
        parts.append(model.forward(ids[t:t + 1], cache=cache))
    assert cache.length == len(ids)
    inc = np.concatenate(parts)
    assert inc.shape == full.shape
    # logits here reach ~20; the tolerance is fp32 rounding of a different
    # summation order at that scale (~4e-5); a cache bug moves logits by ~0.1
    np.testing.assert_allclose(inc, full, atol=2e-6 * np.abs(full).max(), rtol=0)
    with pytest.raises(ValueError):
        model.forward(ids[:1], cache=cache)                      # the cache is full


# =========================================================================== decode step
def test_decode_attention_equals_attention():
    """The one-query path against attention() (the spec, with its mask) and a float64 loop."""
    from llama_np.model import attention, decode_attention
    rng = np.random.default_rng(7)
    for nh, nkv, hd, S in ((4, 2, 8, 1), (9, 3, 64, 37), (6, 6, 16, 5)):
        q = rng.standard_normal((1, nh, hd)).astype(np.float32)
        k = rng.standard_normal((S, nkv, hd)).astype(np.float32) * 2
        v = rng.standard_normal((S, nkv, hd)).astype(np.float32)
        # head-major views of a bigger buffer, as the KV cache holds them
        kc = np.zeros((nkv, S + 3, hd), np.float32)
        vc = np.zeros((nkv, S + 3, hd), np.float32)
        kc[:, :S], vc[:, :S] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        got = decode_attention(q, kc[:, :S], vc[:, :S])
        spec = attention(q, k, v, np.array([S - 1]))
        assert got.shape == spec.shape == (1, nh * hd)
        np.testing.assert_allclose(got, spec, rtol=0, atol=1e-6)
        want = np.zeros((nh, hd))
        for h in range(nh):
            kv = h // (nh // nkv)
            sc = k[:, kv].astype(np.float64) @ q[0, h].astype(np.float64) / math.sqrt(hd)
            p = np.exp(sc - sc.max())
            want[h] = (p / p.sum()) @ v[:, kv].astype(np.float64)
        np.testing.assert_allclose(got[0], want.reshape(-1), rtol=0, atol=2e-6)


def test_rms_norm_same_values_as_np_mean():
    """rms_norm's sum-and-divide is np.mean's: the same float32 bits."""
    from llama_np.model import rms_norm
    rng = np.random.default_rng(8)
    for shape in ((1, 576), (5, 64), (2, 3, 100), (1, 7)):
        x = (rng.standard_normal(shape) * rng.choice([1e-3, 1, 30], shape)).astype(np.float32)
        w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
        old = (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(1e-5))) * w
        np.testing.assert_array_equal(rms_norm(x, w, 1e-5), old)


def _packed_tiny(tmp_path, shared_perm=True):
    """A tiny model whose seven linears are 3-bit g16 uniform weights (random codes),
    q/k/v and gate/up each sharing one act-order permutation (as GPTQ's do)."""
    from refq.formats.uniform import UniformWeight
    folder = str(tmp_path / "packed")
    write_tiny_checkpoint(folder, hidden=64, heads=4, kv_heads=2, ff=96, attention_bias=True)
    model = load_model(folder)
    rng = np.random.default_rng(9)
    for layer in model.layers:
        for grp in LINEAR_GROUPS:
            n = layer.linears[grp[0]].shape[1]
            perm = rng.permutation(n)
            for name in grp:
                out = layer.linears[name].shape[0]
                layer.linears[name] = UniformWeight.from_codes(
                    rng.integers(0, 8, (out, n)), rng.random((out, n // 16)) * 0.05 + 0.01,
                    rng.integers(0, 8, (out, n // 16)), 3, 16, False,
                    perm if shared_perm else rng.permutation(n))
    return folder, model


def test_fused_decode_equals_one_product_per_linear(tmp_path):
    """A decode through the KV cache with q/k/v and gate/up fused: the same logits
    (bits) as one product per linear, and close to the dense model of the
    dequantized weights (an independent computation)."""
    from llama_np import Linear
    from refq.kernels import FusedProduct
    folder, model = _packed_tiny(tmp_path)
    layer = model.layers[0]
    assert isinstance(layer._fused_product(LINEAR_GROUPS[0]), FusedProduct)
    assert isinstance(layer._fused_product(LINEAR_GROUPS[2]), FusedProduct)
    dense = load_model(folder)
    for ld, lq in zip(dense.layers, model.layers):
        for n, q in lq.linears.items():
            ld.linears[n] = Linear(q.dequantize())
    ids = ids_for(12)

    def decode(m, fuse):
        for lay in m.layers:
            lay.fuse = fuse
        cache = m.new_cache(len(ids))
        return np.concatenate([m.forward(ids[:4], cache)]
                              + [m.forward(ids[t:t + 1], cache) for t in range(4, len(ids))])
    fused, sep = decode(model, True), decode(model, False)
    np.testing.assert_array_equal(fused, sep)
    ref = decode(dense, True)
    np.testing.assert_allclose(fused, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # a linear replaced (as calibration swaps weights in): the group is re-examined
    lq = model.layers[0]
    q = lq.linears["self_attn.k_proj"]
    lq.linears["self_attn.k_proj"] = Linear(q.dequantize())
    assert lq._fused_product(LINEAR_GROUPS[0]) is None
    lq.linears["self_attn.k_proj"] = q
    assert lq._fused_product(LINEAR_GROUPS[0]).qs[1] is q
    np.testing.assert_array_equal(decode(model, True), fused)
    # a weight switched to another kernel: the group is re-examined too
    q.kernel = "dequant"
    assert lq._fused_product(LINEAR_GROUPS[0]) is None
    q.kernel = "cpu"
    assert lq._fused_product(LINEAR_GROUPS[0]) is not None


def test_no_fusion_when_permutations_differ(tmp_path):
    _, model = _packed_tiny(tmp_path, shared_perm=False)
    assert all(model.layers[0]._fused_product(g) is None for g in LINEAR_GROUPS[::2])
    dense_linear = load_model(str(tmp_path / "packed")).layers[0]
    assert dense_linear._fused_product(LINEAR_GROUPS[0]) is None      # dense: one product each


# =========================================================================== hooks
@pytest.fixture
def layer_setup(tmp_path):
    folder = str(tmp_path / "layer")
    W = write_tiny_checkpoint(folder, attention_bias=True)
    c = ref_config(folder)
    model = load_model(folder)
    ids = ids_for(9)
    h = model.embed(ids)                                         # (T, d) float32
    return W, c, model, h, np.arange(len(ids))


def test_on_input_hook_sees_each_group_input(layer_setup):
    W, c, model, h, pos = layer_setup
    layer = model.layers[0]
    seen = []
    out = layer.forward(h, pos, on_input=lambda names, x: seen.append((tuple(names), x.copy())))
    assert [n for n, _ in seen] == [tuple(g) for g in LINEAR_GROUPS]
    want_out, inter = ref_layer(W, c, 0, h.astype(np.float64))
    np.testing.assert_allclose(out, want_out, atol=1e-4, rtol=0)
    for (names, x), key in zip(seen, ["attn_in", "o_in", "mlp_in", "down_in"]):
        assert x.shape == inter[key].shape, names
        np.testing.assert_allclose(x, inter[key], atol=1e-4, rtol=0, err_msg=str(names))
    # the captured input times Wᵀ is what the layer adds to the residual
    down_in = seen[3][1]
    wd = W["model.layers.0.mlp.down_proj.weight"]
    ref_no_down, _ = ref_layer(W, c, 0, h.astype(np.float64), zero=("mlp.down_proj",))
    np.testing.assert_allclose(out - ref_no_down, down_in @ wd.T, atol=1e-4, rtol=0)


class _Zero:
    def __init__(self, shape):
        self.shape = shape

    def matmul(self, x):
        return np.zeros(x.shape[:-1] + (self.shape[0],), np.float32)


class _Scaled:
    def __init__(self, inner, s):
        self.inner, self.s = inner, s

    def matmul(self, x):
        return np.float32(self.s) * self.inner.matmul(x)


def test_replacing_linears_changes_output(layer_setup):
    W, c, model, h, pos = layer_setup
    layer = model.layers[0]
    base = layer.forward(h, pos)
    layer.linears["mlp.down_proj"] = _Zero(layer.linears["mlp.down_proj"].shape)
    out = layer.forward(h, pos)
    want, _ = ref_layer(W, c, 0, h.astype(np.float64), zero=("mlp.down_proj",))
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=0)
    assert np.abs(out - base).max() > 1e-2
    # the MLP contribution vanished: the output is h + attention alone
    seen = {}
    layer.forward(h, pos, on_input=lambda n, x: seen.setdefault(n[0], x.copy()))
    attn = seen["self_attn.o_proj"] @ W["model.layers.0.self_attn.o_proj.weight"].T
    np.testing.assert_allclose(out, h + attn, atol=1e-4, rtol=0)

    layer.linears["self_attn.q_proj"] = _Scaled(layer.linears["self_attn.q_proj"], 2.0)
    out2 = layer.forward(h, pos)
    want2, _ = ref_layer(W, c, 0, h.astype(np.float64), zero=("mlp.down_proj",),
                         scale={"self_attn.q_proj": 2.0})
    # the bias is added after .matmul, so only the weight is doubled
    np.testing.assert_allclose(out2, want2, atol=1e-4, rtol=0)


# =========================================================================== perplexity
@pytest.mark.parametrize("n,expect_windows", [(13, 3), (11, 2), (10, 2), (5, 1), (2, 1)])
def test_perplexity_convention(tmp_path, n, expect_windows):
    ctx = 5
    folder = str(tmp_path / "ppl")
    W = write_tiny_checkpoint(folder)
    c = ref_config(folder)
    model = load_model(folder)
    ids = ids_for(n, seed=7)
    nlls, windows = [], 0
    for s in range(0, n, ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:                   # a last window of one token predicts nothing
            continue
        windows += 1
        logits = ref_forward(W, c, w)    # the full window, from position 0
        nlls.extend(ref_nll(logits[:-1], w[1:]))
    assert windows == expect_windows
    seen = []
    ppl, count, nll_sum = perplexity(model, ids, ctx, progress=seen.append)
    assert count == len(nlls) == n - windows - (1 if n % ctx == 1 else 0)
    assert nll_sum == pytest.approx(sum(nlls), rel=1e-5, abs=1e-4)
    assert ppl == pytest.approx(math.exp(np.mean(nlls)), rel=1e-5)
    assert sum(seen) in (n, n - 1)


# =========================================================================== sampling
def test_sample_next_greedy_and_tiny_top_p():
    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = rng.standard_normal(50).astype(np.float32)
        best = int(np.argmax(logits))
        assert sample_next(logits, np.random.default_rng(trial), temperature=0.0) == best
        assert sample_next(logits, np.random.default_rng(trial), temperature=1.0,
                           top_p=1e-9) == best
        assert sample_next(logits, np.random.default_rng(trial), temperature=5.0,
                           top_p=1e-6) == best


def test_sample_next_seeded_reproducible_and_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    a = [sample_next(logits, r, 1.0) for r in [np.random.default_rng(3)] * 200]
    b = [sample_next(logits, r, 1.0) for r in [np.random.default_rng(3)] * 200]
    assert a == b
    assert len(set(a)) > 1
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(logits, rng, 1.0) for _ in range(8000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.025)
    # top_p keeps the smallest most-likely set whose mass reaches top_p
    draws = {sample_next(logits, rng, 1.0, top_p=0.6) for _ in range(500)}
    assert draws == {0, 1}
    draws = {sample_next(logits, rng, 1.0, top_p=0.5) for _ in range(200)}
    assert draws == {0}
    # temperature sharpens: T=0.05 is effectively greedy
    assert {sample_next(logits, rng, 0.05) for _ in range(200)} == {0}


# =========================================================================== generate
def test_generate_greedy_matches_reference_and_stops(tmp_path):
    folder = str(tmp_path / "gen")
    W = write_tiny_checkpoint(folder, seed=3)
    c = ref_config(folder)
    model = load_model(folder)
    prompt = list(ids_for(4, seed=5))
    out = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    assert len(out) == 8
    seq = list(prompt)
    for _ in range(8):                                   # greedy by the reference
        seq.append(int(np.argmax(ref_forward(W, c, seq)[-1])))
    assert out == seq[len(prompt):]

    # stop at the first token that did not appear before it
    k = next(k for k in range(1, len(out)) if out[k] not in out[:k])
    shown = []
    got = generate(model, prompt, 8, temperature=0.0, stop_ids={out[k]}, on_token=shown.append)
    assert got == out[:k] == shown
    assert generate(model, prompt, 8, stop_ids={out[0]}) == []
    assert generate(model, prompt, 1) == out[:1]


def test_generate_seeded_sampling_reproducible(tmp_path):
    folder = str(tmp_path / "gen2")
    write_tiny_checkpoint(folder, seed=4)
    model = load_model(folder)
    prompt = [5, 9, 11]
    a = generate(model, prompt, 10, temperature=1.5, top_p=0.95, seed=11)
    b = generate(model, prompt, 10, temperature=1.5, top_p=0.95, seed=11)
    assert a == b and len(a) == 10
    outs = {tuple(generate(model, prompt, 10, temperature=1.5, seed=s)) for s in range(5)}
    assert len(outs) > 1
