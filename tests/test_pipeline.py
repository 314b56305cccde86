"""refq.quantize_model (refq/pipeline.py), the Python form of `refq quantize`: the same
bytes as the command on a tiny model, and the same result as calling quantize_weight on
each linear through refq.calibrate.quantize_layers by hand."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, write_tiny_checkpoint, tiny_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    folder = str(base / "tiny")
    write_tiny_checkpoint(folder, hidden=64, ff=96, vocab=64)
    calib = base / "calib.txt"
    calib.write_text(tiny_text(list(np.random.default_rng(7).integers(2, 60, 600))))
    return {"folder": folder, "calib": str(calib), "base": base}


def test_quantize_model_writes_the_bytes_refq_quantize_writes(tiny):
    import refq
    from llama_np import Tokenizer, load_model
    from refq.calibrate import calibration_windows
    out_cli = str(tiny["base"] / "cli")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "refq.cli", "quantize", "--model", tiny["folder"],
                        "--method", "gptq", "--bits", "3", "--group-size", "16", "--act-order",
                        "--calib", tiny["calib"], "--nsamples", "4", "--seqlen", "32",
                        "--out", out_cli, "--json"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])

    model, tok = load_model(tiny["folder"]), Tokenizer(tiny["folder"])
    with open(tiny["calib"]) as f:
        text = f.read()
    windows = calibration_windows(tok.encode(text), 4, 32, 0)
    run = refq.quantize_model(model, "gptq", {"bits": 3, "group_size": 16, "act_order": True},
                              windows)
    assert run.bits_per_weight == report["bits_per_weight"]
    assert [r["name"] for r in run.layers] == [r["name"] for r in report["layers"]]
    assert [r["loss"] for r in run.layers] == [r["loss"] for r in report["layers"]]
    import hashlib
    calibration = {"text": "calib.txt", "sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "nsamples": 4, "seqlen": 32, "seed": 0, "true_sequential": False}
    out_api = str(tiny["base"] / "api")
    run.save(out_api, tiny["folder"], calibration=calibration)
    for f in ("model.safetensors", "config.json"):
        with open(os.path.join(out_cli, f), "rb") as a, open(os.path.join(out_api, f), "rb") as b:
            assert a.read() == b.read(), f


def test_quantize_model_equals_quantize_weight_per_linear(tiny):
    """The pipeline adds nothing to a layer's quantization: the same codes as calling
    quantize_weight(W, H) in quantize_layers' own loop."""
    import refq
    from llama_np import Tokenizer, load_model
    from refq.calibrate import calibration_windows, quantize_layers
    tok = Tokenizer(tiny["folder"])
    with open(tiny["calib"]) as f:
        windows = calibration_windows(tok.encode(f.read()), 4, 32, 0)
    by_hand = {}

    def quantize(name, W, H):
        by_hand[name] = refq.quantize_weight(W, H, "rtn", bits=4, group_size=16)
        return by_hand[name]

    quantize_layers(load_model(tiny["folder"]), windows, quantize)
    run = refq.quantize_model(load_model(tiny["folder"]), "rtn", {"bits": 4, "group_size": 16},
                              windows)
    assert list(run.quantized) == list(by_hand)
    for name, q in run.quantized.items():
        assert np.array_equal(q.dequantize(), by_hand[name].dequantize()), name
        assert q.bits_per_weight == by_hand[name].bits_per_weight
