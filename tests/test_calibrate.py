"""refq.calibrate: calibration windows, Hessian accumulation, layer-sequential quantization.

Truth comes from outside the code under test: H is recomputed in float64 from
inputs rebuilt by the float64 reference layer of test_llama_np (or by hand),
and the sequential loop is checked through quantizers whose effect on the
next inputs is known exactly (identity, zeroing).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import llama_np.batched as batched
import refq.calibrate as calibrate
from conftest import REPO, tiny_text, write_tiny_checkpoint
from llama_np import LINEAR_GROUPS, Linear, load_model
from llama_np.model import LINEAR_NAMES, attention, causal_attention
from refq.calibrate import (HessianAccumulator, calibration_windows, capture_hessians,
                            quantize_layers)
from refq.errors import RefqError
from test_llama_np import ref_config, ref_layer, ref_rms

QKV, O, GATE_UP, DOWN = LINEAR_GROUPS
KEYS = {QKV: "attn_in", O: "o_in", GATE_UP: "mlp_in", DOWN: "down_in"}


def gram64(xs):
    """mean x xᵀ over all rows of all xs, in float64: (in, in)."""
    X = np.concatenate([np.asarray(x, np.float64) for x in xs])
    return X.T @ X / len(X)


def assert_h_close(H, want, rtol=1e-5):
    """H vs a float64 reference, relative to the reference's largest entry."""
    assert H.shape == want.shape and H.dtype == np.float64
    np.testing.assert_allclose(H, want, rtol=0, atol=rtol * np.abs(want).max())


# =========================================================================== windows
def test_windows_shape_dtype_and_contiguous_slices():
    ids = np.arange(1000) * 3 + 7                    # every id unique: its position is known
    w = calibration_windows(ids.tolist(), nsamples=20, seqlen=16, seed=5)
    assert w.shape == (20, 16) and w.dtype == np.int64
    for row in w:
        s = (row[0] - 7) // 3
        assert 0 <= s <= 1000 - 16
        np.testing.assert_array_equal(row, ids[s:s + 16])


def test_windows_deterministic_by_seed_and_seeds_differ():
    ids = np.arange(5000)
    a = calibration_windows(ids, 8, 32, seed=0)
    np.testing.assert_array_equal(a, calibration_windows(ids, 8, 32, seed=0))
    b = calibration_windows(ids, 8, 32, seed=1)
    assert not np.array_equal(a, b)


def test_windows_reach_both_ends():
    # 8 tokens, seqlen 4: the starts 0..4 are all possible, the last one included
    ids = np.arange(10, 18)
    starts = {int(r[0]) - 10 for s in range(200) for r in calibration_windows(ids, 2, 4, seed=s)}
    assert starts == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("n_ids,nsamples,seqlen", [(50, 4, 16), (63, 4, 16), (10, 1, 16)])
def test_windows_text_too_short(n_ids, nsamples, seqlen):
    with pytest.raises(RefqError) as e:
        calibration_windows(np.arange(n_ids), nsamples, seqlen, seed=0)
    msg = str(e.value)
    assert f"{n_ids} tokens" in msg
    assert f"--nsamples {nsamples}" in msg and f"--seqlen {seqlen}" in msg
    assert str(nsamples * seqlen) in msg


def test_windows_bad_sizes():
    with pytest.raises(RefqError, match="--nsamples 0"):
        calibration_windows(np.arange(100), 0, 8)
    with pytest.raises(RefqError, match="--seqlen 1"):
        calibration_windows(np.arange(100), 4, 1)


# =========================================================================== Hessian
def test_hessian_accumulator_matches_float64():
    rng = np.random.default_rng(0)
    n = 37
    mix = rng.standard_normal((n, n)).astype(np.float32)
    chunks = [(rng.standard_normal((T, n)).astype(np.float32) @ mix + 0.5).astype(np.float32)
              for T in (1, 13, 64, 200, 7)]
    acc = HessianAccumulator(n)
    for x in chunks:
        acc.add(x)
    H = acc.mean()
    assert acc.tokens == sum(len(x) for x in chunks)
    assert H.dtype == np.float64 and H.shape == (n, n)
    assert np.array_equal(H, H.T)                                # exactly symmetric
    assert_h_close(H, gram64(chunks), rtol=1e-6)                # float32 syrk per chunk


def test_hessian_accumulator_takes_views_and_float64():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 24))
    acc = HessianAccumulator(12)
    acc.add(x[:, ::2])                                           # strided float64 view
    acc.add(x[::3, 1::2].T.copy().T)                             # Fortran-ordered
    want = gram64([x[:, ::2].astype(np.float32), x[::3, 1::2].astype(np.float32)])
    assert_h_close(acc.mean(), want, rtol=1e-6)


# =========================================================================== capture
def _tiny(tmp_path, bias):
    folder = str(tmp_path / "tiny")
    W = write_tiny_checkpoint(folder, attention_bias=bias, layers=2)
    rng = np.random.default_rng(3)
    windows = rng.integers(2, 64, size=(3, 10))
    return folder, W, ref_config(folder), windows


@pytest.fixture
def tiny_bias(tmp_path):
    """With q/k/v biases: the captured inputs must not include them."""
    return _tiny(tmp_path, True)


@pytest.fixture
def tiny(tmp_path):
    """No biases: a zeroed v_proj makes the attention output exactly 0."""
    return _tiny(tmp_path, False)


def test_capture_hessians_every_group(tiny_bias):
    folder, W, c, windows = tiny_bias
    model = load_model(folder)
    hs = [model.embed(w) for w in windows]
    pos = np.arange(windows.shape[1])
    Hs = capture_hessians(model.layers[0], hs, pos, list(LINEAR_GROUPS))
    assert set(Hs) == set(LINEAR_GROUPS)
    inter = [ref_layer(W, c, 0, h.astype(np.float64))[1] for h in hs]
    for g in LINEAR_GROUPS:
        want = gram64([it[KEYS[g]] for it in inter])
        assert_h_close(Hs[g], want)
        assert np.array_equal(Hs[g], Hs[g].T)
    # q/k/v's input by hand: RMSNorm(h) * w
    a = [ref_rms(h.astype(np.float64), W["model.layers.0.input_layernorm.weight"], c["eps"])
         for h in hs]
    assert_h_close(Hs[QKV], gram64(a))


class _Boom:
    def __init__(self, shape):
        self.shape = shape

    def matmul(self, x):
        raise AssertionError("the forward pass was not cut short")


def test_capture_one_group_cuts_forward_short(tiny):
    folder, W, c, windows = tiny
    model = load_model(folder)
    layer = model.layers[1]
    for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        layer.linears[n] = _Boom(layer.linears[n].shape)      # after q/k/v: never reached
    hs = [model.embed(w) for w in windows]
    Hs = capture_hessians(layer, hs, np.arange(windows.shape[1]), [QKV])
    assert list(Hs) == [QKV]
    a = [ref_rms(h.astype(np.float64), W["model.layers.1.input_layernorm.weight"], c["eps"])
         for h in hs]
    assert_h_close(Hs[QKV], gram64(a))


# =========================================================================== quantize_layers
def test_identity_quantizer_leaves_logits_and_calls_in_order(tiny_bias):
    folder, W, c, windows = tiny_bias
    model = load_model(folder)
    ids = windows[0]
    before = model.forward(ids)
    calls, logged = [], []

    def quantize(name, Wq, H):
        np.testing.assert_array_equal(Wq, W[name + ".weight"])
        assert Wq.dtype == np.float32 and H.dtype == np.float64
        assert H.shape == (Wq.shape[1], Wq.shape[1])
        calls.append(name)
        return Linear(np.array(Wq))

    done = quantize_layers(model, windows, quantize, log=lambda i, s: logged.append(i))
    order = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    want = [f"model.layers.{i}.{n}" for i in range(2) for n in order]
    assert calls == want
    assert [n for n, _ in done] == want
    assert logged == [0, 1]
    np.testing.assert_array_equal(model.forward(ids), before)
    assert tuple(order) == LINEAR_NAMES


def _collect(model, windows, zero, true_sequential):
    """Run quantize_layers with a quantizer zeroing the linears in `zero`; {name: H}."""
    seen = {}

    def quantize(name, Wq, H):
        seen[name] = H
        return Linear(np.zeros_like(Wq) if name in zero else np.array(Wq))

    quantize_layers(model, windows, quantize, true_sequential=true_sequential)
    return seen


def test_true_sequential_recaptures_after_each_group(tiny):
    folder, W, c, windows = tiny
    zero = {"model.layers.0.self_attn.v_proj"}
    seq = _collect(load_model(folder), windows, zero, True)
    # v = 0 -> attention output 0 -> o_proj's input is exactly 0
    assert not np.any(seq["model.layers.0.self_attn.o_proj"])
    # ... and the residual passes h unchanged: gate/up see RMSNorm(embed) * w_post
    model = load_model(folder)
    hs = [model.embed(w) for w in windows]
    m = [ref_rms(h.astype(np.float64), W["model.layers.0.post_attention_layernorm.weight"],
                 c["eps"]) for h in hs]
    assert_h_close(seq["model.layers.0.mlp.gate_proj"], gram64(m))
    assert seq["model.layers.0.mlp.gate_proj"] is seq["model.layers.0.mlp.up_proj"]

    # default mode: every H of the layer comes from the original weights
    par = _collect(load_model(folder), windows, zero, False)
    Ho = par["model.layers.0.self_attn.o_proj"]
    assert np.abs(Ho).max() > 1e-3
    fresh = load_model(folder)
    want = capture_hessians(fresh.layers[0], [fresh.embed(w) for w in windows],
                            np.arange(windows.shape[1]), [O])[O]
    np.testing.assert_array_equal(Ho, want)


def test_next_layer_sees_quantized_outputs(tiny):
    folder, W, c, windows = tiny
    zero = {f"model.layers.0.{n}" for n in LINEAR_NAMES}
    for true_sequential in (False, True):
        seen = _collect(load_model(folder), windows, zero, true_sequential)
        # layer 0 adds nothing: layer 1's input is the embedding itself
        emb = [W["model.embed_tokens.weight"][w].astype(np.float64) for w in windows]
        a = [ref_rms(e, W["model.layers.1.input_layernorm.weight"], c["eps"]) for e in emb]
        want = gram64(a)
        H1 = seen["model.layers.1.self_attn.q_proj"]
        assert_h_close(H1, want)
        # (not what the dense layer 0 would have given: the test can tell them apart)
        dense = [ref_layer(W, c, 0, e)[0] for e in emb]
        a_dense = [ref_rms(h, W["model.layers.1.input_layernorm.weight"], c["eps"])
                   for h in dense]
        assert np.abs(gram64(a_dense) - want).max() > 100 * 1e-5 * np.abs(want).max()


# =========================================================================== blocked attention
def attention64(q, k, v):
    """Causal grouped-query attention by brute force in float64, one query at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, nh, hd = q.shape
    rep = nh // k.shape[1]
    o = np.zeros((T, nh, hd))
    for t in range(T):
        for h in range(nh):
            s = k[:t + 1, h // rep] @ q[t, h] / math.sqrt(hd)          # (t+1,)
            p = np.exp(s - s.max())
            o[t, h] = (p / p.sum()) @ v[:t + 1, h // rep]
    return o.reshape(T, nh * hd)


@pytest.mark.parametrize("T,nh,nkv,block", [(1, 4, 2, 64), (5, 3, 3, 2), (64, 6, 2, 16),
                                            (130, 6, 3, 64), (77, 4, 1, 128)])
def test_causal_attention_blocks_match_the_plain_form_and_float64(T, nh, nkv, block):
    rng = np.random.default_rng(T)
    q = rng.standard_normal((T, nh, 8)).astype(np.float32) * 2
    k = rng.standard_normal((T, nkv, 8)).astype(np.float32) * 2
    v = rng.standard_normal((T, nkv, 8)).astype(np.float32)
    want = attention64(q, k, v)
    plain = attention(q, k, v, np.arange(T))
    fast = causal_attention(q, k, v, block=block)
    assert fast.shape == plain.shape == (T, nh * 8) and fast.dtype == np.float32
    np.testing.assert_allclose(plain, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(fast, want, rtol=0, atol=2e-6)


# =========================================================================== threads, batches
@pytest.fixture
def tiny64(tmp_path):
    """A tiny model (with q/k/v biases) and 12 windows of 64 tokens."""
    folder = str(tmp_path / "tiny")
    W = write_tiny_checkpoint(folder, attention_bias=True, layers=2)
    windows = np.random.default_rng(4).integers(2, 64, size=(12, 64))
    return folder, W, windows


def _run_all(folder, windows, **kw):
    """quantize_layers with a quantizer that rounds W to a grid of 1/8:
    -> ({name: H}, the quantized model's logits on window 0)."""
    model, seen = load_model(folder), {}

    def quantize(name, W, H):
        seen[name] = H
        return Linear((np.round(W * 8) / 8).astype(np.float32))
    quantize_layers(model, windows, quantize, **kw)
    return seen, model.forward(windows[0])


@pytest.mark.parametrize("true_sequential", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
def test_threads_do_not_change_a_bit(tiny64, true_sequential, batch):
    folder, W, windows = tiny64
    base_H, base_logits = _run_all(folder, windows, true_sequential=true_sequential,
                                   threads=1, calib_batch=batch)
    for threads in (2, 3):
        H, logits = _run_all(folder, windows, true_sequential=true_sequential,
                             threads=threads, calib_batch=batch)
        assert list(H) == list(base_H)
        for name in H:
            assert np.array_equal(H[name], base_H[name]), (threads, name)
        assert np.array_equal(logits, base_logits)


def test_batch_size_changes_h_only_in_float32_rounding(tiny64):
    folder, W, windows = tiny64
    one, _ = _run_all(folder, windows, threads=1, calib_batch=1)
    for batch in (5, 12):
        H, _ = _run_all(folder, windows, threads=2, calib_batch=batch)
        for name in H:
            assert_h_close(H[name], one[name], rtol=2e-6)


def test_hessians_of_batched_passes_match_float64_layer(tiny64):
    """Every H of layer 1 (after a quantized layer 0) against the float64 reference
    layer run on the inputs rebuilt from the quantized layer-0 weights."""
    folder, W, windows = tiny64
    c = ref_config(folder)
    H, _ = _run_all(folder, windows, threads=2, calib_batch=5)
    Wq = {k: (np.round(v * 8) / 8 if k.startswith("model.layers.0.") and k.endswith(
          "proj.weight") else v) for k, v in W.items()}
    emb = [W["model.embed_tokens.weight"][w].astype(np.float64) for w in windows]
    inter = [ref_layer(Wq, c, 1, ref_layer(Wq, c, 0, e)[0])[1] for e in emb]
    for g in LINEAR_GROUPS:
        want = gram64([it[KEYS[g]] for it in inter])
        for name in g:
            assert_h_close(H["model.layers.1." + name], want)


def test_true_sequential_computes_each_product_once(tiny64, monkeypatch):
    """Rows x in x out of every linear product of a layer: true-sequential mode
    multiplies by q,k,v,o and down once per token, gate and up twice (g is
    recomputed rather than held); the default mode multiplies by every linear
    twice (original, quantized weights) except down_proj (once)."""
    folder, W, windows = tiny64
    n, T = windows.shape
    work = []
    real = batched.product

    def counting(x, Wt, b=None):
        work.append(x.size // x.shape[-1] * Wt.size)
        return real(x, Wt, b)
    monkeypatch.setattr(batched, "product", counting)
    sizes = {k.split(".", 3)[3][:-len(".weight")]: v.size for k, v in W.items()
             if k.startswith("model.layers.0.") and k.endswith("proj.weight")}
    for ts, times in ((True, {"mlp.gate_proj": 2, "mlp.up_proj": 2}),
                      (False, {n_: 2 for n_ in LINEAR_NAMES if n_ != "mlp.down_proj"})):
        work.clear()
        _run_all(folder, windows, true_sequential=ts, threads=2, calib_batch=5)
        want = 2 * sum(n * T * sz * times.get(k, 1) for k, sz in sizes.items())
        assert sum(work) == want, ts


def test_quantizers_and_workers_run_single_threaded_blas(tiny64, monkeypatch):
    """OpenBLAS's threaded Cholesky (GPTQ) and some products give other last bits
    on 2 threads than on 1: inside quantize_layers every BLAS call, the
    quantizer's included, runs on one thread, whatever the thread count."""
    from threadpoolctl import threadpool_info
    folder, W, windows = tiny64
    seen = []

    def quantize(name, Wq, H):
        seen.append({i["filepath"]: i["num_threads"] for i in threadpool_info()
                     if i["user_api"] == "blas"})
        return Linear(np.array(Wq))

    real = calibrate.gram

    def gram(x):
        seen.append({i["filepath"]: i["num_threads"] for i in threadpool_info()
                     if i["user_api"] == "blas"})
        return real(x)
    monkeypatch.setattr(calibrate, "gram", gram)
    quantize_layers(load_model(folder), windows, quantize, threads=2, calib_batch=3)
    assert len(seen) == 14 + 2 * 4 * 4 and all(seen)
    assert all(set(d.values()) == {1} for d in seen)


# =========================================================================== whole CLI
def test_quantize_bytes_do_not_depend_on_blas_or_numba_threads(tmp_path):
    """The whole `refq quantize` output, 1 vs 2 BLAS and numba threads (subprocesses).
    The model is big enough (hidden 128) for OpenBLAS to run GPTQ's Cholesky on
    2 threads when allowed (its last bits then differ from 1 thread's), though
    too small for such differences to flip a code: this checks the whole
    path; test_quantizers_and_workers_run_single_threaded_blas checks the cause."""
    folder = str(tmp_path / "tiny")
    write_tiny_checkpoint(folder, hidden=128, ff=160, heads=4, kv_heads=2, layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text(np.random.default_rng(2).integers(2, 64, size=600)) + "\n")
    procs = {}
    for t in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=t, NUMBA_NUM_THREADS=t, OMP_NUM_THREADS=t,
                   REFQ_HOME=str(tmp_path / "home"), PYTHONDONTWRITEBYTECODE="1")
        args = ["quantize", "--model", folder, "--method", "gptq", "--bits", "3",
                "--group-size", "32", "--act-order", "--calib", str(calib), "--nsamples", "8",
                "--seqlen", "64", "--out", str(tmp_path / f"out{t}")]
        procs[t] = subprocess.Popen([sys.executable, "-m", "refq.cli", *args], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for t, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    files = sorted(os.listdir(tmp_path / "out1"))
    assert files == sorted(os.listdir(tmp_path / "out2")) and "model.safetensors" in files
    for f in files:
        assert (tmp_path / "out1" / f).read_bytes() == (tmp_path / "out2" / f).read_bytes(), f


# =========================================================================== perplexity
def test_perplexity_on_threads_is_the_same_bytes_and_matches_float64(tiny64):
    from llama_np import perplexity
    folder, W, windows = tiny64
    model = load_model(folder)
    ids = windows.reshape(-1)[:300]
    # by hand: float64 log-softmax of each window's logits, windows of 64 (last one: 44)
    nll, n = 0.0, 0
    for s in range(0, len(ids), 64):
        w = ids[s:s + 64]
        z = model.forward(w[:-1]).astype(np.float64)
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        nll += float((lse - z[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    runs = [perplexity(model, ids, 64, threads=t) for t in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2]
    ppl, n_got, nll_got = runs[0]
    assert n_got == n == 300 - 5
    # (perplexity multiplies several windows' rows at once: OpenBLAS rounds some small
    # shapes' products otherwise in the last bit than one window's)
    assert nll_got == pytest.approx(nll, rel=1e-6)
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-6)


# =========================================================================== resume
@pytest.mark.parametrize("extra", [[], ["--true-sequential", "--calib-batch", "3"]])
def test_killed_quantize_resumes_after_the_last_finished_layer(tmp_path, monkeypatch, extra):
    """A run killed while quantizing layer 2 (of 4), restarted with the same
    arguments, quantizes only layers 2-3 and writes the same bytes as a run
    never killed; other arguments start afresh."""
    import refq.api
    from refq.cli import main
    from refq.resume import state_dir
    folder = str(tmp_path / "tiny")
    write_tiny_checkpoint(folder, layers=4)
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text(np.random.default_rng(5).integers(2, 64, size=400)) + "\n")
    monkeypatch.setenv("REFQ_HOME", str(tmp_path / "home"))
    real = refq.api.quantize_weight
    calls = []

    def counting(W, H, method, name="", **kw):
        calls.append(name)
        if kill_at and name.startswith(kill_at):
            raise KeyboardInterrupt                  # the run dies here
        return real(W, H, method, name=name, **kw)
    monkeypatch.setattr(refq.api, "quantize_weight", counting)

    def run(out, seed="0"):
        calls.clear()
        return main(["quantize", "--model", folder, "--method", "gptq", "--bits", "3",
                     "--group-size", "16", "--calib", str(calib), "--nsamples", "6",
                     "--seqlen", "32", "--seed", seed, "--json", "--out", str(out), *extra])

    kill_at = None
    assert run(tmp_path / "whole") == 0
    assert len(calls) == 28 and not os.path.exists(state_dir(tmp_path / "whole"))

    out = tmp_path / "resumed"
    kill_at = "model.layers.2."
    assert run(out) == 130                           # what refq says on Ctrl-C
    assert not out.exists()
    assert sorted(os.listdir(state_dir(out)))[:3] == ["done.json", "fingerprint.json",
                                                      "inputs-2.npy"]
    kill_at = None
    assert run(out) == 0
    assert calls == [c for c in calls if c.startswith(("model.layers.2.", "model.layers.3."))]
    assert len(calls) == 14
    for f in sorted(os.listdir(tmp_path / "whole")):
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
    assert not os.path.exists(state_dir(out))

    # killed before any layer is finished: nothing is left beside --out
    out = tmp_path / "early"
    kill_at = "model.layers.0."
    assert run(out) == 130
    assert not out.exists() and not os.path.exists(state_dir(out))

    # killed again, then restarted with another seed: the state is not used
    out = tmp_path / "other"
    kill_at = "model.layers.3."
    assert run(out) == 130
    kill_at = None
    assert run(out, seed="1") == 0 and len(calls) == 28
