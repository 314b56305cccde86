"""Packed checkpoints run through the kernels (eval/generate/Python API, --kernel), and
`refq bench kernels`."""
import json
import os

import numpy as np
import pytest

from conftest import assert_one_line_error, tiny_text, write_tiny_checkpoint


def cli(capsys, *args):
    from refq.cli import main
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny model quantized with RTN 4-bit g16 (in-process, no calibration text needed)."""
    from llama_np import load_model
    from refq.api import quantize_weight
    from refq.checkpoint import save_packed
    base = tmp_path_factory.mktemp("kcli")
    folder = str(base / "tiny")
    write_tiny_checkpoint(folder, hidden=64, ff=96, vocab=64)
    model = load_model(folder)
    quantized = {}
    for i, layer in enumerate(model.layers):
        for n, lin in layer.linears.items():
            W = np.ascontiguousarray(lin.weight, dtype=np.float32)
            quantized[f"model.layers.{i}.{n}"] = quantize_weight(
                W, np.eye(W.shape[1]), "rtn", bits=4, group_size=16)
    out = str(base / "packed")
    save_packed(out, folder, model, quantized, {"method": "rtn", "options": {"bits": 4, "group_size": 16}})
    text = base / "eval.txt"
    text.write_text(tiny_text(list(np.random.default_rng(3).integers(2, 60, 400))))
    return {"folder": folder, "packed": out, "text": str(text)}


def test_python_api_kernels_match(packed):
    from refq.checkpoint import load_packed_model
    ids = np.arange(1, 20) % 60
    m_cpu = load_packed_model(packed["packed"], kernel="cpu")
    m_deq = load_packed_model(packed["packed"], kernel="dequant")
    a, b = m_cpu.forward(ids), m_deq.forward(ids)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
    q = m_cpu.layers[0].linears["mlp.up_proj"]
    assert q.kernel == "cpu" and q._dense is None            # no dense copy kept
    c = m_cpu.new_cache(8)                                   # decode: batch-1 products
    for t in ids[:5]:
        last = m_cpu.forward([t], c)
    assert np.linalg.norm(last - a[4:5]) / np.linalg.norm(a[4:5]) < 1e-5


def test_eval_same_ppl_cpu_and_dequant(packed, capsys):
    res = {}
    for k in ("cpu", "dequant"):
        rc, out, err = cli(capsys, "eval", "--model", packed["packed"], "--text", packed["text"],
                           "--ctx", 32, "--json", "--kernel", k)
        assert rc == 0, err
        res[k] = json.loads(out)
    assert abs(res["cpu"]["ppl"] - res["dequant"]["ppl"]) <= 1e-5 * res["dequant"]["ppl"]
    assert res["cpu"]["tokens"] == res["dequant"]["tokens"]


def test_generate_kernel_cpu(packed, capsys):
    outs = []
    for k in ("cpu", "dequant"):
        rc, out, err = cli(capsys, "generate", "--model", packed["packed"], "--prompt", "w5 w7",
                           "--max-new-tokens", 5, "--kernel", k)
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1]


def test_kernel_gpu_without_gpu(packed, capsys):
    try:
        from refq.kernels.gpu import require_gpu
        require_gpu()
        pytest.skip("a GPU is present")
    except Exception:
        pass
    for cmd in ("eval", "generate"):
        rc, out, err = cli(capsys, cmd, "--model", packed["packed"], "--kernel", "gpu")
        assert_one_line_error(rc, out, err, "--kernel gpu")
    rc, out, err = cli(capsys, "eval", "--model", packed["packed"], "--kernel", "tpu")
    assert rc == 2


def test_bench_kernels_json(capsys):
    rc, out, err = cli(capsys, "bench", "kernels", "--shape", "40x64", "--batch", "1,3",
                       "--format", "uniform-w4g128", "--format", "additive-2x8", "--format", "codebook-w4",
                       "--repeat", 1, "--json")
    assert rc == 0, err
    res = json.loads(out)
    rows = res["rows"]
    assert [(r["format"], r["batch"]) for r in rows] == [
        ("uniform-w4g128", 1), ("uniform-w4g128", 3), ("additive-2x8", 1), ("additive-2x8", 3),
        ("codebook-w4", 1), ("codebook-w4", 3)]
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["blas_fp32_ms"] > 0 and r["copy_gbps"] > 0
        assert 0 < r["ms_min"] <= r["ms"] and r["speedup_vs_blas_min"] > 0
    import numba
    assert res["numba"] == numba.__version__ and res["isa"] and res["cpu"]
    assert "ISA:" in err and "load average" in err and f"ISA: {res['isa']}" in err
    # each row: effective GB/s on the packed bytes next to the measured copy bandwidth
    rows_out = [ln for ln in err.splitlines() if "GB/s packed, copy" in ln]
    assert len(rows_out) == len(rows)
    for ln, r in zip(rows_out, rows):
        assert f"copy {r['copy_gbps']:5.1f} GB/s" in ln


@pytest.mark.parametrize("args,what", [
    (["--shape", "40x"], "--shape"),
    (["--batch", "0"], "--batch"),
    (["--batch", "a"], "--batch"),
    (["--repeat", "0"], "--repeat"),
    (["--format", "uniform-w9g128"], "--format"),
    (["--format", "uniform-w3g0"], "--format"),
])
def test_bench_kernels_bad_args(args, what, capsys):
    rc, out, err = cli(capsys, "bench", "kernels", "--format", "uniform-w4g128", *args)
    assert_one_line_error(rc, out, err, what)
