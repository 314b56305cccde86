"""AQLM block fine-tuning (refq/finetune.py): never worse on the calibration MSE (keep
best), recovers a deliberately perturbed codebook, leaves the stored format (bits) alone,
and `refq quantize --finetune` / `refq info` record its history."""
import copy
import warnings
import json
import os

import numpy as np
import pytest

from conftest import write_tiny_checkpoint, write_tiny_workspace
from refq.api import quantize_weight
from refq.finetune import finetune_layer

from test_backward import tiny_config, tiny_model

AQ = dict(num_codebooks=2, nbits_per_codebook=4, in_group_size=2, max_iters=3)   # 4 bits


def block_mse(layer, xs, targets, pos):
    """The layer's calibration MSE through its own forward (the kernels, not backward.py)."""
    return float(np.mean([np.mean((layer.forward(x, pos) - t).astype(np.float64) ** 2)
                          for x, t in zip(xs, targets)]))


def quantized_layer(method, **options):
    """Layer 0 of a tiny float32 model (biases), its inputs and unquantized outputs, then
    its linears quantized with `method` (H = I)."""
    cfg = tiny_config(bias=True, layers=1)
    model = tiny_model(cfg, np.float32, seed=3)
    layer = model.layers[0]
    rng = np.random.default_rng(0)
    pos = np.arange(12)
    xs = [rng.standard_normal((12, 16)).astype(np.float32) for _ in range(6)]
    targets = [layer.forward(x, pos) for x in xs]
    for n, lin in list(layer.linears.items()):
        layer.linears[n] = quantize_weight(lin.weight, np.eye(lin.weight.shape[1]), method,
                                           name=n, **options)
    return layer, xs, targets, pos


def stored_layout(layer):
    """{linear: (bits per weight, {stored tensor: (dtype, shape)})}: what fine-tuning must keep."""
    return {n: (q.bits_per_weight, {k: (v.dtype, v.shape) for k, v in q.tensors().items()})
            for n, q in layer.linears.items()}


@pytest.fixture(scope="module")
def quantized():
    """Layer 0 of a tiny float32 model, its inputs/targets, then its linears AQLM-quantized."""
    return quantized_layer("aqlm", **AQ)


@pytest.fixture()
def setup(quantized):
    """A fresh copy for each test (fine-tuning changes the layer in place)."""
    layer, xs, targets, pos = quantized
    return copy.deepcopy(layer), xs, targets, pos


def finetune_lowers_mse(setup, options, factor):
    """Fine-tune the block of `setup`: its MSE, measured before and after, falls below
    factor x before, the record matches the measurements, and every stored tensor keeps
    its bits, dtype and shape. Returns (layer, info)."""
    layer, xs, targets, pos = setup
    layout = stored_layout(layer)
    before = block_mse(layer, xs, targets, pos)
    info = finetune_layer(layer, xs, targets, pos, options)
    after = block_mse(layer, xs, targets, pos)
    assert info["mse_before"] == pytest.approx(before, rel=1e-4)
    assert info["mse_after"] == pytest.approx(after, rel=1e-4)     # what is stored is what was measured
    assert after < factor * before
    assert info["mse_after"] == min(info["mse_history"])
    assert stored_layout(layer) == layout                          # bits, dtypes, shapes
    return layer, info


def test_finetune_lowers_mse_and_keeps_bits(setup):
    _, info = finetune_lowers_mse(setup, dict(lr=1e-3, epochs=8, relative_tolerance=0), 0.9)
    assert len(info["mse_history"]) == info["epochs"] + 1


def test_keep_best_never_raises_the_mse(setup):
    """A step size that only makes things worse: the layer comes back unchanged."""
    layer, xs, targets, pos = setup
    stored = {n: {k: v.copy() for k, v in q.tensors().items()} for n, q in layer.linears.items()}
    before = block_mse(layer, xs, targets, pos)
    with pytest.warns(UserWarning, match="diverged at lr 10 "):
        info = finetune_layer(layer, xs, targets, pos, dict(lr=10.0, epochs=3))
    assert max(info["mse_history"][1:]) > info["mse_history"][0]    # it did get worse...
    assert block_mse(layer, xs, targets, pos) == before             # ...and none of it was kept
    for n, q in layer.linears.items():
        for k, v in q.tensors().items():
            np.testing.assert_array_equal(v, stored[n][k])


def test_perturbed_codebook_is_recovered(setup):
    layer, xs, targets, pos = setup
    q = layer.linears["mlp.up_proj"]
    ref = block_mse(layer, xs, targets, pos)
    rng = np.random.default_rng(5)
    cb = q.codebooks.astype(np.float32)
    q.codebooks = (cb + np.std(cb) * rng.standard_normal(cb.shape)).astype(np.float16)
    q._dense = None
    damaged = block_mse(layer, xs, targets, pos)
    assert damaged > 10 * ref
    finetune_layer(layer, xs, targets, pos, dict(lr=3e-3, epochs=60, relative_tolerance=0))
    assert block_mse(layer, xs, targets, pos) <= ref + 0.1 * (damaged - ref)


def test_cli_finetune_record_and_info(tmp_path, capsys):
    from refq.cli import main
    write_tiny_workspace(tmp_path, [("calib.txt", 200)], seed=7)
    folder, calib = str(tmp_path / "model"), str(tmp_path / "calib.txt")
    common = ["quantize", "--model", folder, "--method", "aqlm", "--num-codebooks", "1",
              "--nbits-per-codebook", "3", "--in-group-size", "4", "--max-iters", "2",
              "--nsamples", "3", "--seqlen", "16", "--calib", calib, "--json"]
    got = {}
    for name, extra in (("plain", []), ("ft", ["--finetune", "--finetune-epochs", "2",
                                                "--finetune-lr", "1e-3"])):
        capsys.readouterr()
        assert main(common + extra + ["--out", str(tmp_path / name)]) == 0
        got[name] = json.loads(capsys.readouterr().out)
    ft = got["ft"]["finetune"]
    assert ft["options"]["lr"] == 1e-3 and ft["options"]["epochs"] == 2
    assert [r["layer"] for r in ft["layers"]] == [0, 1]
    for r in ft["layers"]:
        assert 2 <= len(r["mse_history"]) <= 3 and r["mse_after"] <= r["mse_before"]
    assert "finetune" not in got["plain"]
    assert got["ft"]["bits_per_weight"] == got["plain"]["bits_per_weight"]
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning" in out and "layer 1" in out
    assert main(["info", "--json", str(tmp_path / "ft")]) == 0
    assert json.loads(capsys.readouterr().out)["finetune"]["layers"][1]["layer"] == 1
    with open(os.path.join(tmp_path, "ft", "config.json")) as f:
        assert json.load(f)["quantization_config"]["finetune"]["options"]["epochs"] == 2

    # loss_and_grads on the packed checkpoint read back: gradients of the stored fields
    from llama_np import loss_and_grads
    from llama_np.generate import log_softmax_nll
    from refq.checkpoint import load_packed_model
    model = load_packed_model(str(tmp_path / "ft"))
    ids = np.arange(2, 14)
    loss, grads = loss_and_grads(model, ids)
    assert loss == pytest.approx(float(np.mean(log_softmax_nll(model.forward(ids[:-1]), ids[1:]))),
                                 rel=1e-4)
    q = model.layers[1].linears["mlp.down_proj"]
    assert grads["model.layers.1.mlp.down_proj.codebooks"].shape == q.codebooks.shape
    assert grads["model.layers.1.mlp.down_proj.scales"].shape == q.scales.shape
    assert "model.layers.1.mlp.down_proj.weight" not in grads


@pytest.mark.parametrize("extra, msg", [
    (["--method", "gptq", "--finetune"], "--finetune: only for --method aqlm or slim"),
    (["--method", "slim", "--finetune-epochs", "2"], "--finetune-epochs: needs --finetune"),
    (["--method", "slim", "--finetune", "--finetune-batch-size", "0"], "--finetune-batch-size 0"),
    (["--method", "aqlm", "--finetune-lr", "1e-3"], "--finetune-lr: needs --finetune"),
    (["--method", "aqlm", "--finetune", "--finetune-lr", "-1"], "--finetune-lr -1"),
    (["--method", "aqlm", "--finetune", "--finetune-epochs", "0"], "--finetune-epochs 0"),
])
def test_cli_finetune_errors(tmp_path, capsys, extra, msg):
    from refq.cli import main
    folder = str(tmp_path / "tiny")
    write_tiny_checkpoint(folder)
    capsys.readouterr()
    rc = main(["quantize", "--model", folder, *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def _without_seconds(obj):
    """A JSON value with every "seconds" key left out (wall times differ run to run)."""
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def test_killed_finetune_run_resumes_with_the_same_bytes(tmp_path, monkeypatch, capsys):
    """`refq quantize --method aqlm --finetune` killed while quantizing layer 2 of 4,
    restarted: only layers 2-3 are quantized and fine-tuned again, and the output is
    the uninterrupted run's (model.safetensors byte for byte, config.json but for the
    wall times): the fine-tuned norms and codebooks of layers 0-1 and their records
    come from the resume state."""
    import refq.api
    import refq.finetune
    from llama_np import Checkpoint
    from refq.cli import main
    from refq.resume import state_dir
    write_tiny_workspace(tmp_path, [("calib.txt", 200)], seed=7, layers=4, attention_bias=True)
    folder, calib = str(tmp_path / "model"), str(tmp_path / "calib.txt")
    monkeypatch.setenv("REFQ_HOME", str(tmp_path / "home"))
    real_q, real_ft = refq.api.quantize_weight, refq.finetune.finetune_layer
    calls, tuned = [], []

    def counting(W, H, method, name="", **kw):
        calls.append(name)
        if kill_at and name.startswith(kill_at):
            raise KeyboardInterrupt                  # the run dies here
        return real_q(W, H, method, name=name, **kw)

    def finetune_layer(layer, *a, **kw):
        tuned.append(layer.index)
        return real_ft(layer, *a, **kw)
    monkeypatch.setattr(refq.api, "quantize_weight", counting)
    monkeypatch.setattr(refq.finetune, "finetune_layer", finetune_layer)

    def run(out):
        calls.clear(), tuned.clear()
        return main(["quantize", "--model", folder, "--method", "aqlm", "--num-codebooks", "1",
                     "--nbits-per-codebook", "3", "--in-group-size", "4", "--max-iters", "2",
                     "--nsamples", "3", "--seqlen", "16", "--calib", calib, "--finetune",
                     "--finetune-epochs", "3", "--finetune-lr", "1e-2",
                     "--finetune-tolerance", "0", "--out", str(out)])

    kill_at = None
    assert run(tmp_path / "whole") == 0 and tuned == [0, 1, 2, 3]
    out = tmp_path / "resumed"
    kill_at = "model.layers.2."
    assert run(out) == 130 and not out.exists() and tuned == [0, 1]
    kill_at = None
    assert run(out) == 0
    assert tuned == [2, 3] and {c.split(".")[2] for c in calls} == {"2", "3"}
    assert not os.path.exists(state_dir(out))
    capsys.readouterr()
    whole = Checkpoint(str(tmp_path / "whole"))
    orig = Checkpoint(folder)
    for i in (0, 1):       # fine-tuning did change what the state had to keep
        for n in ("input_layernorm.weight", "self_attn.q_proj.bias"):
            name = f"model.layers.{i}.{n}"
            assert not np.array_equal(whole.get(name), orig.get(name)), name
    for f in sorted(os.listdir(tmp_path / "whole")):
        if f == "config.json":
            with open(tmp_path / "whole" / f) as a, open(out / f) as b:
                assert _without_seconds(json.load(a)) == _without_seconds(json.load(b))
        else:
            assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


# ---------------------------------------------------------------------------
# Adam diverging: one warning, nothing non-finite stored, the pre-divergence state kept
# ---------------------------------------------------------------------------
def stored_tensors(layer):
    return {n: {k: v.copy() for k, v in q.tensors().items()} for n, q in layer.linears.items()}


def assert_same_tensors(layer, want):
    for n, q in layer.linears.items():
        for k, v in q.tensors().items():
            np.testing.assert_array_equal(v, want[n][k], err_msg=f"{n}.{k}")


def test_divergent_lr_warns_once_and_stores_nothing_nonfinite(setup):
    """lr 1e6 throws the codebooks past float16's range at the first step: one one-line
    warning naming the layer and the lr; the layer is left exactly as it was."""
    layer, xs, targets, pos = setup
    before = stored_tensors(layer)
    with pytest.warns(UserWarning) as caught:
        info = finetune_layer(layer, xs, targets, pos, dict(lr=1e6, epochs=5), name="model.layers.7")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert "model.layers.7" in msgs[0] and "lr 1e+06" in msgs[0] and "diverged" in msgs[0]
    assert "(epoch 1, step 1:" in msgs[0]                           # caught at the step, not later
    assert "diverged" in info and info["mse_after"] == info["mse_before"]
    assert_same_tensors(layer, before)


def test_divergence_after_progress_keeps_the_pre_divergence_state(setup, monkeypatch):
    """Adam's step size blows up (x1e12) from its 13th step on (epoch 3 of 6-window epochs):
    the warning comes, and the stored layer is bit for bit the one of a run stopped after
    epoch 2 (the best before the divergence), with no NaN or inf anywhere."""
    import refq.finetune as ft
    layer, xs, targets, pos = setup
    ref_layer = copy.deepcopy(layer)
    opts = dict(lr=1e-3, epochs=2, relative_tolerance=0)
    ref = finetune_layer(ref_layer, xs, targets, pos, opts)
    assert ref["mse_after"] < ref["mse_before"]                     # epochs 1-2 did improve

    step = ft.Adam.step

    def exploding(self, theta, g):
        if self.t >= 12:
            self.lr = 1e9
        return step(self, theta, g)
    monkeypatch.setattr(ft.Adam, "step", exploding)
    with pytest.warns(UserWarning, match=r"diverged at lr 0\.001 \(epoch 3"):
        info = finetune_layer(layer, xs, targets, pos, dict(opts, epochs=10))
    assert info["mse_history"] == ref["mse_history"] and info["mse_after"] == ref["mse_after"]
    assert_same_tensors(layer, stored_tensors(ref_layer))
    for q in layer.linears.values():
        assert all(np.all(np.isfinite(v.astype(np.float64))) for v in q.tensors().values())
    np.testing.assert_array_equal(layer.input_norm, ref_layer.input_norm)


# ---------------------------------------------------------------------------
# SLiM adapter fine-tuning
# ---------------------------------------------------------------------------
def slim_layer(adapter_bits=None):
    """Layer 0 of a tiny model (biases), its inputs/targets, linears SLiM-compressed
    (2:4 wanda + 4-bit SLiM-Quant + rank-2 adapters; fp16 or adapter_bits)."""
    extra = {} if adapter_bits is None else dict(adapter_bits=adapter_bits, adapter_group_size=8)
    return quantized_layer("slim", rank=2, **extra)


@pytest.fixture(scope="module", params=[None, 4], ids=["fp16-adapters", "4bit-adapters"])
def slim_quantized(request):
    return slim_layer(request.param)


@pytest.fixture()
def slim_setup(slim_quantized):
    layer, xs, targets, pos = slim_quantized
    return copy.deepcopy(layer), xs, targets, pos


BASE_FIELDS = ("qvalues", "scales", "idx24")                        # the frozen sparse quantized base


def test_slim_finetune_lowers_mse_keeps_base_and_bits(slim_setup):
    base = {n: {k: q.fields[k].copy() for k in BASE_FIELDS} for n, q in slim_setup[0].linears.items()}
    layer, _ = finetune_lowers_mse(slim_setup, dict(lr=1e-2, epochs=10, relative_tolerance=0), 0.8)
    for n, q in layer.linears.items():                              # W_c untouched, adapters moved
        for k in BASE_FIELDS:
            np.testing.assert_array_equal(q.fields[k], base[n][k])


def test_slim_keep_best_never_raises_the_mse(slim_setup):
    """lr 10 only makes things worse: the layer comes back bit-identical (and it warns)."""
    layer, xs, targets, pos = slim_setup
    stored = stored_tensors(layer)
    before = block_mse(layer, xs, targets, pos)
    with pytest.warns(UserWarning, match="lr 10 "):
        info = finetune_layer(layer, xs, targets, pos, dict(lr=10.0, epochs=3))
    assert max(info["mse_history"][1:]) > info["mse_history"][0]
    assert block_mse(layer, xs, targets, pos) == before
    assert_same_tensors(layer, stored)


def test_slim_keep_best_over_many_epochs(slim_setup):
    """Whatever the lr, the stored MSE is <= the layer's before (several lrs, 6 epochs)."""
    layer0, xs, targets, pos = slim_setup
    before = block_mse(layer0, xs, targets, pos)
    for lr in (1e-4, 1e-2, 0.3):
        layer = copy.deepcopy(layer0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = finetune_layer(layer, xs, targets, pos, dict(lr=lr, epochs=6, relative_tolerance=0))
        assert block_mse(layer, xs, targets, pos) <= before * (1 + 1e-6)
        assert info["mse_after"] <= info["mse_before"]


def test_slim_perturbed_adapter_is_recovered():
    """fp16 adapters: noise of 5 std on up_proj's L doubles the MSE; fine-tuning the
    adapters brings it back to within 10% of the damage."""
    layer, xs, targets, pos = slim_layer()
    q = layer.linears["mlp.up_proj"]
    ref = block_mse(layer, xs, targets, pos)
    L = q.fields["lora_L"].astype(np.float32)
    q.fields["lora_L"] = (L + 5 * np.std(L) * np.random.default_rng(5).standard_normal(L.shape)
                          ).astype(np.float16)
    q._lr = None
    damaged = block_mse(layer, xs, targets, pos)
    assert damaged > 2 * ref
    finetune_layer(layer, xs, targets, pos, dict(lr=3e-3, epochs=40, relative_tolerance=0))
    assert block_mse(layer, xs, targets, pos) <= ref + 0.1 * (damaged - ref)


def test_slim_adapter_gradients_finite_differences():
    """The gradient the SLiM loop follows (block_mse_and_grads, then dŴ -> dL, dR) against
    central differences of the block MSE in float64, on every adapter entry of two linears
    and sampled entries of the others."""
    from llama_np import backward as B
    from refq.finetune import SlimBlock
    from test_backward import EPS, numgrad, rel_err
    layer, xs, targets, pos = slim_layer()
    blk = SlimBlock(layer)
    blk.fixed = B.layer_params(layer, np.float64)
    blk.base = {n: b.astype(np.float64) for n, b in blk.base.items()}
    th = {k: v.astype(np.float64) for k, v in blk.theta().items()}
    x, t = xs[0].astype(np.float64), targets[0].astype(np.float64)
    _, _, gP = B.block_mse_and_grads(blk.params(th), blk.cfg, x, pos, t)
    g = blk.theta_grads(th, gP)
    assert set(g) == {f"{n}.lora_{x}" for n in layer.linears for x in "LR"}
    f = lambda: B.block_mse_and_grads(blk.params(th), blk.cfg, x, pos, t)[0]   # noqa: E731
    rng = np.random.default_rng(0)
    for k, v in th.items():
        full = k.startswith(("mlp.up_proj", "self_attn.k_proj"))
        idx = None if full else rng.choice(v.size, 6, replace=False)
        want = numgrad(f, v, idx)
        got = g[k].reshape(-1) if full else g[k].reshape(-1)[idx]
        assert rel_err(got, want) <= 1e-6, k
    assert EPS == 1e-6


def test_slim_adapter_gradients_whole_model_finite_differences():
    """loss_and_grads on a model whose linears are SLiM-compressed: dloss/dL, dloss/dR vs
    central differences of the model's NLL, float64 (adapters held in float64)."""
    from llama_np import loss_and_grads
    from test_backward import numgrad, rel_err
    cfg = tiny_config(bias=True, layers=2)
    model = tiny_model(cfg, np.float64, seed=4)
    for layer in model.layers:
        for n, lin in list(layer.linears.items()):
            q = quantize_weight(lin.weight.astype(np.float32), np.eye(lin.weight.shape[1]), "slim",
                                name=n, rank=2)
            q._lr = tuple(a.astype(np.float64) for a in q.adapters())   # the point of expansion,
            q._base = q.base().astype(np.float64)                        # Ŵ = W_c + L R in float64
            layer.linears[n] = q
    ids = np.array([1, 5, 3, 9, 2, 7, 7, 4, 11, 0])
    _, grads = loss_and_grads(model, ids, dtype=np.float64)
    f = lambda: loss_and_grads(model, ids, dtype=np.float64)[0]     # noqa: E731
    rng = np.random.default_rng(1)
    for i, layer in enumerate(model.layers):
        for n in ("self_attn.q_proj", "mlp.down_proj"):
            L, R = layer.linears[n]._lr
            for x, A in (("L", L), ("R", R)):
                idx = rng.choice(A.size, 5, replace=False)
                got = grads[f"model.layers.{i}.{n}.lora_{x}"].reshape(-1)[idx]
                assert rel_err(got, numgrad(f, A, idx)) <= 1e-6, (i, n, x)


def test_cli_slim_finetune(tmp_path, capsys):
    """refq quantize --method slim --finetune: recorded, bits unchanged, the checkpoint's
    adapters are the fine-tuned ones (its block MSE is the recorded one); a divergent lr
    gives one warning line per layer and a finite checkpoint."""
    from refq.cli import main
    write_tiny_workspace(tmp_path, [("calib.txt", 200)], seed=7)
    folder, calib = str(tmp_path / "model"), str(tmp_path / "calib.txt")
    common = ["quantize", "--model", folder, "--method", "slim", "--rank", "4",
              "--nsamples", "3", "--seqlen", "16", "--calib", calib, "--json"]
    got, errs = {}, {}
    for name, extra in (("plain", []), ("ft", ["--finetune", "--finetune-epochs", "3",
                                                "--finetune-lr", "1e-2"]),
                        ("div", ["--finetune", "--finetune-lr", "1e6"])):
        capsys.readouterr()
        assert main(common + extra + ["--out", str(tmp_path / name)]) == 0
        out = capsys.readouterr()
        got[name], errs[name] = json.loads(out.out), out.err
    ft = got["ft"]["finetune"]
    assert ft["options"]["lr"] == 1e-2 and ft["options"]["beta2"] == 0.999
    assert [r["layer"] for r in ft["layers"]] == [0, 1]
    assert all(r["mse_after"] < r["mse_before"] for r in ft["layers"])
    assert got["ft"]["bits_per_weight"] == got["plain"]["bits_per_weight"]
    warn = [ln for ln in errs["div"].splitlines() if "diverged" in ln]
    assert len(warn) == 2 and all("lr 1e+06" in ln for ln in warn)
    assert "model.layers.0" in warn[0] and "model.layers.1" in warn[1]
    assert "diverged" not in errs["ft"]
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ft")]) == 0
    assert "fine-tuning" in capsys.readouterr().out
    from refq.checkpoint import load_packed_model
    for name in ("ft", "div"):
        model = load_packed_model(str(tmp_path / name))
        for layer in model.layers:
            for q in layer.linears.values():
                assert all(np.all(np.isfinite(v.astype(np.float64))) for v in q.tensors().values())
    # the divergent run stored what the plain run stored
    plain, div = (load_packed_model(str(tmp_path / n)) for n in ("plain", "div"))
    for lp, ld in zip(plain.layers, div.layers):
        for n in lp.linears:
            for k, v in lp.linears[n].tensors().items():
                np.testing.assert_array_equal(ld.linears[n].tensors()[k], v)
