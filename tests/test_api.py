"""Public API: storage accounting, serialisation round trips, matmul, errors."""

import json

import numpy as np
import pytest

from refq.api import QuantizedWeight, layer_loss, load_quantized, quantize_weight
from refq.errors import RefqError


def problem(out=10, n=20, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)).astype(np.float32)
    X = rng.standard_normal((200, n)) @ (np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    return W, X.T @ X / 200


CONFIGS = [
    ("rtn", dict()), ("rtn", dict(bits=3, group_size=8)), ("rtn", dict(bits=2, sym=True, group_size=7)),
    ("rtn", dict(bits=8, mse=True)), ("gptq", dict()), ("gptq", dict(bits=3, group_size=8, act_order=True)),
    ("gptq", dict(bits=5, group_size=6, act_order=True, static_groups=True)),
    ("gptq", dict(bits=7, sym=True, act_order=True)),
]


def stored_bytes(qw):
    return sum(t.nbytes for t in qw.tensors().values())


@pytest.mark.parametrize("method,kw", CONFIGS)
def test_bits_accounting_exact(method, kw):
    W, H = problem()
    qw = quantize_weight(W, H, method, **kw)
    assert isinstance(qw, QuantizedWeight)
    assert qw.bits_per_weight == 8 * stored_bytes(qw) / (10 * 20)
    bd = qw.bits_breakdown
    assert sum(bd.values()) == pytest.approx(qw.bits_per_weight, rel=1e-12)
    assert set(bd) <= {"codes", "scales", "zeros", "perm"}
    assert bd["codes"] >= kw.get("bits", 4)


def test_bits_hand_counted():
    W, H = problem()
    # 10 x 20, 3 bits, groups of 8 -> 3 groups (8, 8, 4)
    # codes: 10 rows * ceil(60/8)=8 bytes = 80; scales: 10*3 fp16 = 60 bytes;
    # zeros: ceil(30*3/8) = 12 bytes  -> 152 bytes = 1216 bits / 200 = 6.08
    qw = quantize_weight(W, H, "rtn", bits=3, group_size=8)
    assert qw.bits_per_weight == 6.08
    assert qw.bits_breakdown == {"codes": 3.2, "scales": 2.4, "zeros": 0.48}
    # sym: no zeros stored -> 140 bytes
    assert quantize_weight(W, H, "rtn", bits=3, group_size=8, sym=True).bits_per_weight == 5.6
    # act_order with groups adds a uint16 perm of 20 entries = 40 bytes -> 192 bytes
    g = quantize_weight(W, H, "gptq", bits=3, group_size=8, act_order=True)
    assert g.tensors()["perm"].dtype == np.uint16
    assert g.bits_per_weight == 7.68
    assert g.bits_breakdown["perm"] == 1.6


@pytest.mark.parametrize("method,kw", CONFIGS)
def test_roundtrip_tensors_meta(method, kw, tmp_path):
    W, H = problem(seed=3)
    qw = quantize_weight(W, H, method, name="model.layers.0.self_attn.q_proj", **kw)
    meta = json.loads(json.dumps(qw.meta()))
    assert meta["format"] == "uniform" and meta["format_version"] == 1
    assert meta["method"] == method and meta["shape"] == [10, 20]
    back = type(qw).from_tensors(qw.tensors(), meta)
    np.testing.assert_array_equal(back.dequantize(), qw.dequantize())
    # through safetensors and the format dispatcher
    from safetensors.numpy import load_file, save_file
    save_file(qw.tensors(), str(tmp_path / "w.safetensors"))
    loaded = load_quantized(load_file(str(tmp_path / "w.safetensors")), meta)
    np.testing.assert_array_equal(loaded.dequantize(), qw.dequantize())
    assert loaded.bits_per_weight == qw.bits_per_weight
    assert loaded.options == qw.options


@pytest.mark.parametrize("method,kw", CONFIGS[:6])
def test_dequantize_and_matmul(method, kw):
    W, H = problem(seed=4)
    qw = quantize_weight(W, H, method, **kw)
    deq = qw.dequantize()
    assert deq.dtype == np.float32 and deq.shape == (10, 20)
    assert np.max(np.abs(deq - W)) < 2.5
    x = np.random.default_rng(5).standard_normal((3, 4, 20)).astype(np.float32)
    y = qw.matmul(x)
    assert y.shape == (3, 4, 10) and y.dtype == np.float32
    # the numba kernels (issue #8) sum in their own order: equal within float error
    # (relative Frobenius error <= 1e-5); the "dequant" kernel is the dense reference
    ref = x @ deq.T
    assert np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)
    y1 = qw.matmul(x[0, 0])
    assert np.linalg.norm(y1 - ref[0, 0]) <= 1e-5 * np.linalg.norm(ref[0, 0])
    np.testing.assert_array_equal(qw.matmul(x, kernel="dequant"),
                                  (x.reshape(12, 20) @ deq.T).reshape(3, 4, 10))


def test_layer_loss():
    rng = np.random.default_rng(6)
    W, Q = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    H = rng.standard_normal((4, 4))
    H = H @ H.T
    expected = sum((W[r] - Q[r]) @ H @ (W[r] - Q[r]) for r in range(3))
    assert layer_loss(W, Q, H) == pytest.approx(expected, rel=1e-12)
    assert isinstance(layer_loss(W, Q, H), float)


@pytest.mark.parametrize("kw,match", [
    (dict(bogus=1), "bogus"),
    (dict(act_order=True), "act_order"),          # not an rtn option
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"), (dict(bits=True), "bits"),
    (dict(group_size=0), "group_size"), (dict(group_size=-1), "group_size"),
    (dict(sym="yes"), "sym"),
])
def test_option_errors(kw, match):
    W, H = problem()
    with pytest.raises(RefqError, match=match):
        quantize_weight(W, H, "rtn", **kw)


def test_gptq_option_errors():
    W, H = problem()
    for kw, match in [(dict(percdamp=-1), "percdamp"), (dict(percdamp=float("nan")), "percdamp"),
                      (dict(blocksize=0), "blocksize"), (dict(seed=0), "seed")]:
        with pytest.raises(RefqError, match=match):
            quantize_weight(W, H, "gptq", **kw)


def test_input_errors():
    W, H = problem()
    name = "model.layers.3.self_attn.q_proj"
    with pytest.raises(RefqError, match="unknown method 'nope'"):
        quantize_weight(W, H, "nope")
    Wn = W.copy()
    Wn[1, 2] = np.nan
    with pytest.raises(RefqError, match=rf"{name}: W contains 1 NaN/Inf"):
        quantize_weight(Wn, H, "gptq", name=name)
    Hn = H.copy()
    Hn[0, 0] = np.inf
    with pytest.raises(RefqError, match=rf"{name}: H contains"):
        quantize_weight(W, Hn, "gptq", name=name)
    with pytest.raises(RefqError, match="2-D"):
        quantize_weight(W[0], None, "rtn")


def test_load_errors():
    W, H = problem()
    qw = quantize_weight(W, H, "rtn", bits=3, group_size=8)
    with pytest.raises(RefqError, match="unknown format"):
        load_quantized(qw.tensors(), dict(qw.meta(), format="nope"))
    with pytest.raises(RefqError, match="format_version"):
        load_quantized(qw.tensors(), dict(qw.meta(), format_version=99))
    t = dict(qw.tensors())
    t["scales"] = t["scales"][:, :2]
    with pytest.raises(RefqError, match="scales"):
        load_quantized(t, qw.meta())
    t = dict(qw.tensors())
    del t["qzeros"]
    with pytest.raises(RefqError, match="qzeros"):
        load_quantized(t, qw.meta())
