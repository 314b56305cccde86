"""SqueezeLLM's Fisher sensitivity (refq/fisher.py): the sum over windows of squared
gradients, against finite differences; streamed = stored; it steers the k-means; the CLI."""
import json
import os

import numpy as np
import pytest

from conftest import write_tiny_workspace
from refq.api import quantize_weight
from refq.errors import RefqError
from refq.fisher import compute_fisher, use_fisher

from test_backward import numgrad, tiny_config, tiny_model


def test_fisher_is_sum_of_squared_finite_difference_gradients():
    from llama_np import loss_and_grads
    cfg = tiny_config(bias=True)
    model = tiny_model(cfg)                                          # float64 weights
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 7))
    F = compute_fisher(model, windows)
    assert set(F) == {f"model.layers.{i}.{n}" for i in range(2) for n in model.layers[i].linears}
    W = model.layers[1].linears["mlp.down_proj"].weight
    idx = [0, 17, W.size - 1]
    want = 0.0
    for w in windows:                                                # Σ_w (∂L_w/∂W)²
        g = numgrad(lambda: loss_and_grads(model, w, dtype=np.float64)[0], W, idx)
        want = want + g ** 2
    got = F["model.layers.1.mlp.down_proj"].reshape(-1)[idx]
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_fisher_without_context_is_a_one_line_error():
    with pytest.raises(RefqError, match="fisher") as e:
        quantize_weight(np.ones((2, 8), np.float32), np.eye(8), "squeezellm",
                        sensitivity="fisher", name="x")
    assert "\n" not in str(e.value)
    with use_fisher({"y": np.ones((2, 8))}), pytest.raises(RefqError, match="no Fisher"):
        quantize_weight(np.ones((2, 8), np.float32), np.eye(8), "squeezellm",
                        sensitivity="fisher", name="x")


def test_fisher_steers_the_kmeans():
    """2 bits = 4 centroids per row: with a dominant Fisher on 4 chosen entries of each
    row, the weighted k-means puts a centroid on each (exact up to fp16)."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 40)).astype(np.float32)
    F = np.full(W.shape, 1e-6)
    chosen = np.stack([rng.choice(40, 4, replace=False) for _ in range(6)])
    np.put_along_axis(F, chosen, 1e6, axis=1)
    H = np.eye(40)
    with use_fisher({"l": F}):
        q = quantize_weight(W, H, "squeezellm", bits=2, sensitivity="fisher", name="l")
    Wq = q.dequantize()
    exact = np.take_along_axis(W, chosen, 1).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.take_along_axis(Wq, chosen, 1), exact)
    q_h = quantize_weight(W, H, "squeezellm", bits=2, name="l")     # hessian_diag: not so
    assert not np.array_equal(np.take_along_axis(q_h.dequantize(), chosen, 1), exact)


def test_cli_fisher(tmp_path, capsys):
    from refq.cli import main
    write_tiny_workspace(tmp_path, [("calib.txt", 200)], seed=7)
    folder, calib = str(tmp_path / "model"), str(tmp_path / "calib.txt")
    got = {}
    for sens in ("fisher", "hessian_diag"):
        out = str(tmp_path / sens)
        capsys.readouterr()
        rc = main(["quantize", "--model", folder, "--method", "squeezellm", "--bits", "3",
                   "--sensitivity", sens, "--nsamples", "3", "--seqlen", "16",
                   "--calib", calib, "--out", out, "--json"])
        assert rc == 0
        got[sens] = json.loads(capsys.readouterr().out)
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["quantization_config"]["options"]["sensitivity"] == sens
    assert got["fisher"]["fisher_windows"] == 3 and got["fisher"]["fisher_seconds"] >= 0
    assert "fisher_seconds" not in got["hessian_diag"]
    assert [r["loss"] for r in got["fisher"]["layers"]] != [r["loss"] for r in got["hessian_diag"]["layers"]]
