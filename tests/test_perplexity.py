"""llama_np.perplexity, the layer-by-layer evaluation over many windows at once
(window_nlls / final_hidden), against a straightforward per-window computation:
each window through the model's KV-cache forward (the plain `attention`, not the
blocked one; a packed checkpoint's weights from its numpy dequantize(), not the
numba row decoder), then a float64 log-softmax by hand.  For a dense and a packed
(GPTQ w3 act-order) model, for each protocol, with the batches, chunks and head
products cut small so that every boundary is crossed; and the same bytes for any
number of threads."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_text, write_tiny_checkpoint
from llama_np import load_model, perplexity
from llama_np.generate import eval_windows

gen = sys.modules["llama_np.generate"]      # (llama_np.generate is also a function's name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"dense": (model, reference model), "packed": (...)}: a tiny model with q/k/v
    biases, and its GPTQ w3 g16 act-order packed checkpoint (refq quantize)."""
    from refq.checkpoint import load_packed_model
    from refq.cli import main
    base = tmp_path_factory.mktemp("ppl")
    folder = str(base / "tiny")
    write_tiny_checkpoint(folder, layers=3, attention_bias=True, hidden=32, ff=48)
    calib = base / "calib.txt"
    calib.write_text(tiny_text(np.random.default_rng(5).integers(2, 64, size=400)) + "\n")
    assert main(["quantize", "--model", folder, "--method", "gptq", "--bits", "3",
                 "--group-size", "16", "--act-order", "--calib", str(calib), "--nsamples", "4",
                 "--seqlen", "32", "--out", str(base / "w3")]) == 0
    return {"dense": (load_model(folder), load_model(folder)),
            "packed": (load_packed_model(str(base / "w3")),
                       load_packed_model(str(base / "w3"), kernel="dequant")),
            "folders": {"dense": folder, "packed": str(base / "w3")}, "base": base}


def reference_nll(model, ids, ctx, protocol, bos_id=None):
    """(Σ −log p, tokens scored): window by window, the KV-cache forward (plain
    attention) and a float64 log-softmax."""
    nll, n = 0.0, 0
    for w, first in eval_windows(ids, ctx, protocol, bos_id):
        z = model.forward(w[:-1], cache=model.new_cache(len(w))).astype(np.float64)[first:]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        tgt = w[first + 1:]
        nll += float((lse - z[np.arange(len(tgt)), tgt]).sum())
        n += len(tgt)
    return nll, n


IDS = np.random.default_rng(11).integers(0, 64, size=300)


@pytest.mark.parametrize("kind", ["dense", "packed"])
@pytest.mark.parametrize("protocol, bos", [("refq", None), ("gptq", None), ("llama.cpp", 1)])
@pytest.mark.parametrize("small", [False, True])
def test_perplexity_matches_per_window_float64(models, monkeypatch, kind, protocol, bos, small):
    model, ref = models[kind]
    if small:   # one window per batch, two per chunk, 20 rows per head product
        monkeypatch.setattr(gen, "BATCH_TOKENS", 100)
        monkeypatch.setattr(gen, "CHUNK_FLOATS", model.cfg.hidden_size * 130)
        monkeypatch.setattr(gen, "HEAD_FLOATS", model.cfg.vocab_size * 20)
    want, n_want = reference_nll(ref, IDS, 64, protocol, bos)
    seen = []
    ppl, n, nll = perplexity(model, IDS, 64, progress=seen.append, protocol=protocol,
                             bos_id=bos, threads=2)
    assert n == n_want == {"refq": 300 - 5, "gptq": 4 * 63, "llama.cpp": 4 * 31}[protocol]
    assert nll == pytest.approx(want, rel=2e-6)           # float32 rounding, no more
    assert ppl == pytest.approx(math.exp(want / n_want), rel=2e-6)
    assert sum(seen) == sum(len(w) for w, _ in eval_windows(IDS, 64, protocol, bos))
    assert all(s >= 0 for s in seen)


@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_perplexity_same_bytes_for_any_thread_count(models, kind):
    model, _ = models[kind]
    runs = [perplexity(model, IDS, 64, threads=t) for t in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2]


def test_refq_eval_same_ppl_with_1_or_2_blas_and_numba_threads(models):
    """`refq eval --json` of the packed model in subprocesses: OPENBLAS, NUMBA and OMP
    threads 1 vs 2 (the default worker count follows the BLAS's) print the same ppl."""
    text = models["base"] / "eval.txt"
    text.write_text(tiny_text(np.random.default_rng(8).integers(2, 64, size=200)) + "\n")
    got = []
    for t in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=t, NUMBA_NUM_THREADS=t, OMP_NUM_THREADS=t,
                   REFQ_HOME=str(models["base"] / "home"), PYTHONDONTWRITEBYTECODE="1")
        p = subprocess.run([sys.executable, "-m", "refq.cli", "eval", "--model",
                            models["folders"]["packed"], "--text", str(text), "--ctx", "32",
                            "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr
        got.append(json.loads(p.stdout)["ppl"])
    assert got[0] == got[1]


def test_log_softmax_nll_is_the_float64_formula():
    from llama_np.generate import log_softmax_nll
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((11, 1000)) * 5).astype(np.float32)    # 11: not a multiple of 4
    t = rng.integers(0, 1000, size=11)
    z64 = z.astype(np.float64)
    want = np.log(np.exp(z64 - z64.max(-1, keepdims=True)).sum(-1)) + z64.max(-1) - z64[np.arange(11), t]
    np.testing.assert_allclose(log_softmax_nll(z, t), want, rtol=1e-6)


def test_prefill_weight_is_the_dequantized_weight(models):
    """What the batched products multiply by: the packed weight, decoded once (the
    numba row decoder), equal to the format's numpy dequantize()."""
    from refq.kernels import prefill_weight
    model, _ = models["packed"]
    for name, q in model.layers[1].linears.items():
        W = prefill_weight(q, "cpu")
        assert W.dtype == np.float32 and W.shape == q.shape and W.flags.c_contiguous
        np.testing.assert_allclose(W, q.dequantize(), rtol=0, atol=1e-6 * np.abs(W).max())
    assert prefill_weight(q, "gpu") is q                   # its products stay on its kernel
    assert prefill_weight(q, "dequant") is prefill_weight(q, "dequant")   # kept on q
