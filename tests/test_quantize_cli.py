"""`refq quantize`, `refq info` and packed checkpoints, end to end on a tiny model.

Independent truths used here:
  * bits per weight of the uniform format worked out by hand (codes + fp16
    scales + packed zeros), and the file size of model.safetensors from its
    8-byte header length and the unquantized tensors' bytes;
  * an RTN reference written here in numpy from the grid's definition
    (GPTQ's quant.py convention), compared bit for bit with what was stored;
  * the layer losses recomputed in float64 numpy from the stored weights and
    the H of an in-process calibration run;
  * perplexities recomputed in-process from the saved checkpoint.

The quantize runs whose environment matters (thread counts) are real
subprocesses, run concurrently by one module fixture; the rest call
refq.cli.main in-process, which is much faster.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, assert_one_line_error, tiny_text, write_tiny_checkpoint
from llama_np import LINEAR_NAMES, Tokenizer, load_model, perplexity
from refq.errors import RefqError

N_CALIB, N_EVAL = 300, 120
GPTQ_ARGS = ["--method", "gptq", "--bits", "4", "--group-size", "16",
             "--nsamples", "4", "--seqlen", "16"]
# the tiny model's linears (hidden 32, 4 heads of 8, 2 kv heads, ff 48): (out, in)
SHAPES = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32),
          "self_attn.v_proj": (16, 32), "self_attn.o_proj": (32, 32),
          "mlp.gate_proj": (48, 32), "mlp.up_proj": (48, 32), "mlp.down_proj": (32, 48)}
NAMES = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEAR_NAMES]


def run_cli(args, home, env=None, timeout=300):
    env = dict(os.environ, REFQ_HOME=str(home), PYTHONDONTWRITEBYTECODE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "refq.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli(capsys, *args):
    """refq.cli.main in-process -> (exit code, stdout, stderr)."""
    from refq.cli import main
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_nothing_written(out):
    parent, base = os.path.split(os.path.abspath(out))
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(parent) if f.startswith(f".{base}.tmp-")]


def header_of(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return n, header


# =========================================================================== fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("qcli"))
    folder = os.path.join(base, "tiny")
    W = write_tiny_checkpoint(folder)
    rng = np.random.default_rng(7)
    calib, evalt = os.path.join(base, "calib.txt"), os.path.join(base, "eval.txt")
    with open(calib, "w") as f:
        f.write(tiny_text(rng.integers(2, 64, size=N_CALIB)) + "\n")
    with open(evalt, "w") as f:
        f.write(tiny_text(rng.integers(2, 64, size=N_EVAL)) + "\n")
    nan = os.path.join(base, "nan")
    write_tiny_checkpoint(nan)
    st = os.path.join(nan, "model.safetensors")
    t = load_file(st)
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(t, st)
    home = os.path.join(base, "home")
    os.makedirs(home)
    return dict(base=base, folder=folder, W=W, calib=calib, eval=evalt, nan=nan, home=home)


@pytest.fixture(scope="module")
def runs(tiny):
    """The subprocess runs, concurrently: name -> (CompletedProcess, out folder)."""
    b = tiny["base"]
    common = ["quantize", "--model", tiny["folder"], *GPTQ_ARGS, "--calib", tiny["calib"],
              "--json", "--eval", "--eval-text", tiny["eval"]]
    jobs = {
        "t2": (common + ["--out", os.path.join(b, "out-t2")],
               {"NUMBA_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}),
        "t1": (common + ["--out", os.path.join(b, "out-t1")],
               {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}),
        # a third run: a difference that depends on the process (hash order) shows up
        # in one pair of two runs half the time, in one of three pairs 3/4 of the time
        "t1b": (common + ["--out", os.path.join(b, "out-t1b")],
                {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                 "PYTHONHASHSEED": "12345"}),
        "nan": (["quantize", "--model", tiny["nan"], *GPTQ_ARGS, "--calib", tiny["calib"],
                 "--out", os.path.join(b, "out-nan")], {}),
        "bits9": (["quantize", "--model", tiny["folder"], "--method", "gptq", "--bits", "9",
                   "--calib", tiny["calib"], "--out", os.path.join(b, "out-bits9")], {}),
    }
    with ThreadPoolExecutor(len(jobs)) as ex:
        futs = {k: ex.submit(run_cli, a, tiny["home"], env) for k, (a, env) in jobs.items()}
        return {k: (f.result(), jobs[k][0][jobs[k][0].index("--out") + 1])
                for k, f in futs.items()}


@pytest.fixture(scope="module")
def main_run(runs):
    r, out = runs["t2"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout                     # the JSON object alone on stdout
    return json.loads(lines[0]), out


@pytest.fixture(scope="module")
def reference(tiny):
    """The pipeline in-process: {name: (QuantizedWeight, H)}, and the quantized model."""
    import refq
    from refq.calibrate import calibration_windows, quantize_layers
    model, tok = load_model(tiny["folder"]), Tokenizer(tiny["folder"])
    with open(tiny["calib"]) as f:
        windows = calibration_windows(tok.encode(f.read()), 4, 16, seed=0)
    got = {}

    def quantize(name, W, H):
        q = refq.quantize_weight(W, H, "gptq", bits=4, group_size=16)
        got[name] = (q, H)
        return q

    quantize_layers(model, windows, quantize)
    return got, model


# =========================================================================== the main run
def test_json_report(main_run):
    js, _ = main_run
    assert set(js) == {"method", "options", "bits_per_weight", "seconds", "layers",
                       "ppl_before", "ppl_after"}
    assert js["method"] == "gptq"
    assert js["options"]["bits"] == 4 and js["options"]["group_size"] == 16
    assert [r["name"] for r in js["layers"]] == NAMES
    for r in js["layers"]:
        assert set(r) == {"name", "loss", "bits_per_weight"}
        assert np.isfinite(r["loss"]) and r["loss"] > 0
        # codes 4 + fp16 scale per 16 weights (1) + 4-bit zero per 16 weights (0.25)
        assert r["bits_per_weight"] == 5.25
    assert js["bits_per_weight"] == 5.25
    assert js["seconds"] >= 0
    assert np.isfinite(js["ppl_before"]) and np.isfinite(js["ppl_after"])
    assert js["ppl_after"] != js["ppl_before"]


def test_cli_matches_in_process_pipeline(main_run, reference, tiny):
    from refq.checkpoint import load_packed
    js, out = main_run
    got, qmodel = reference
    _, _, qc, qws = load_packed(out)
    assert sorted(qws) == sorted(NAMES)
    for row in js["layers"]:
        name = row["name"]
        q_ref, H = got[name]
        Q = qws[name].dequantize()
        np.testing.assert_array_equal(Q, q_ref.dequantize(), err_msg=name)
        E = tiny["W"][name + ".weight"].astype(np.float64) - Q.astype(np.float64)
        loss = float(np.trace(E @ H @ E.T))                      # tr((W-Q) H (W-Q)ᵀ)
        assert abs(row["loss"] - loss) <= 1e-9 * loss, name
    tok = Tokenizer(tiny["folder"])
    with open(tiny["eval"]) as f:
        ids = tok.encode(f.read())
    assert len(ids) == N_EVAL
    ppl_dense, n, _ = perplexity(load_model(tiny["folder"]), ids, 512)
    ppl_q, _, _ = perplexity(qmodel, ids, 512)
    assert n == N_EVAL - 1
    assert abs(js["ppl_before"] / ppl_dense - 1) < 1e-12
    assert abs(js["ppl_after"] / ppl_q - 1) < 1e-12
    cal = qc["calibration"]
    assert (cal["nsamples"], cal["seqlen"], cal["seed"]) == (4, 16, 0)


def test_eval_and_info_on_output(main_run, tiny, capsys):
    js, out = main_run
    rc, stdout, err = cli(capsys, "eval", "--model", out, "--text", tiny["eval"], "--json")
    assert rc == 0, err
    ev = json.loads(stdout)
    assert ev["tokens"] == N_EVAL - 1
    assert abs(ev["ppl"] / js["ppl_after"] - 1) < 1e-6
    rc, stdout, err = cli(capsys, "info", out)
    assert rc == 0, err
    assert "gptq" in stdout and "5.2500" in stdout and "14 linears" in stdout
    rc, stdout, err = cli(capsys, "info", out, "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    assert info["method"] == "gptq" and info["quantized_linears"] == 14
    assert info["quantized_weights"] == sum(o * i for o, i in SHAPES.values()) * 2
    assert abs(info["bits_per_weight"] - js["bits_per_weight"]) < 1e-12
    assert abs(sum(info["bits_breakdown"].values()) - info["bits_per_weight"]) < 1e-9


def test_folder_size_matches_bits_per_weight(main_run, tiny):
    js, out = main_run
    path = os.path.join(out, "model.safetensors")
    n, header = header_of(path)
    linear_weights = {nm + ".weight" for nm in NAMES}
    unquantized = {k: v for k, v in tiny["W"].items() if k not in linear_weights}
    # the stored tensors: every unquantized one under its HF name, and per linear
    # exactly qweight, scales, qzeros (asymmetric, no act_order)
    want_names = set(unquantized) | {f"{nm}.{f}" for nm in NAMES
                                     for f in ("qweight", "scales", "qzeros")}
    assert set(header) == want_names
    unq_bytes = sum(a.astype(np.float32).nbytes for a in unquantized.values())
    shape = {nm: SHAPES[nm.split(".", 3)[3]] for nm in NAMES}
    quant_bits = sum(r["bits_per_weight"] * shape[r["name"]][0] * shape[r["name"]][1]
                     for r in js["layers"])
    assert os.path.getsize(path) - 8 - n - unq_bytes == quant_bits / 8


def test_deterministic_across_thread_counts(runs, main_run):
    _, out2 = main_run
    for run in ("t1", "t1b"):
        r1, out1 = runs[run]
        assert r1.returncode == 0, r1.stderr
        for f in ("model.safetensors", "config.json", "tokenizer.json"):
            with open(os.path.join(out1, f), "rb") as a, open(os.path.join(out2, f), "rb") as b:
                assert a.read() == b.read(), (run, f)
        assert json.loads(r1.stdout)["layers"] == main_run[0]["layers"]


def test_other_seed_other_calibration(main_run, tiny, capsys):
    _, out0 = main_run
    out = os.path.join(tiny["base"], "out-seed1")
    rc, _, err = cli(capsys, "quantize", "--model", tiny["folder"], *GPTQ_ARGS,
                     "--calib", tiny["calib"], "--seed", "1", "--out", out)
    assert rc == 0, err
    with open(os.path.join(out, "config.json")) as f:
        cal = json.load(f)["quantization_config"]["calibration"]
    assert cal["seed"] == 1
    with open(os.path.join(out, "model.safetensors"), "rb") as a, \
            open(os.path.join(out0, "model.safetensors"), "rb") as b:
        assert a.read() != b.read()


# =========================================================================== round trips
def unpack_ref(packed, bits, n):
    """Codes from a little-endian bitstream (code k at bits [k*b, (k+1)*b)): (..., n)."""
    bitstream = np.unpackbits(np.asarray(packed, np.uint8), axis=-1, bitorder="little")
    b = bitstream[..., :n * bits].reshape(*packed.shape[:-1], n, bits).astype(np.int64)
    return (b << np.arange(bits)).sum(-1)


def decode_uniform_ref(t, meta):
    """The uniform format decoded from its docstring (FORMAT.md), independently of refq."""
    out, n = meta["shape"]
    bits, g, sym = meta["bits"], meta["group_size"] or n, meta["sym"]
    G = -(-n // g)
    codes = unpack_ref(t["qweight"], bits, n)                        # (out, n) stored order
    zeros = (np.full((out, G), 2 ** (bits - 1)) if sym else
             unpack_ref(t["qzeros"], bits, out * G).reshape(out, G))
    gidx = np.arange(n) // g
    s = t["scales"].astype(np.float32)[:, gidx]
    w = s * (codes.astype(np.float32) - zeros.astype(np.float32)[:, gidx])
    if "perm" in t:
        full = np.empty_like(w)
        full[:, t["perm"].astype(np.int64)] = w
        w = full
    return w


@pytest.mark.parametrize("opts,config", [
    (["--method", "gptq", "--bits", "4", "--group-size", "16"], dict(bits=4, group_size=16)),
    (["--method", "gptq", "--bits", "3", "--group-size", "16", "--act-order"],
     dict(bits=3, group_size=16, act_order=True)),
    (["--method", "gptq", "--bits", "3", "--group-size", "16", "--act-order",
      "--static-groups"], dict(bits=3, group_size=16, act_order=True, static_groups=True)),
    (["--method", "gptq", "--bits", "2", "--group-size", "24", "--sym"],
     dict(bits=2, group_size=24, sym=True)),
    (["--method", "rtn", "--bits", "5", "--sym"], dict(bits=5, sym=True)),
])
def test_save_load_round_trip_bit_exact(tmp_path, tiny, opts, config):
    """quantize_layers + save_packed, then load_packed: the same weights, bit for bit,
    and the loaded model gives the same logits as the in-memory one."""
    import refq
    from refq.calibrate import calibration_windows, quantize_layers
    from refq.checkpoint import load_packed, load_packed_model, save_packed
    method = opts[1]
    model, tok = load_model(tiny["folder"]), Tokenizer(tiny["folder"])
    with open(tiny["calib"]) as f:
        windows = calibration_windows(tok.encode(f.read()), 4, 16, seed=0)
    quantized = {}

    hessians = {}

    def quantize(name, W, H):
        quantized[name] = refq.quantize_weight(W, H, method, **config)
        hessians[name] = H
        return quantized[name]

    quantize_layers(model, windows, quantize)
    out = str(tmp_path / "packed")
    save_packed(out, tiny["folder"], model, quantized, {"method": method, "options": config})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    _, _, qc, loaded = load_packed(out)
    assert sorted(loaded) == sorted(quantized)
    perms = 0
    for name, q in quantized.items():
        p = loaded[name]
        np.testing.assert_array_equal(p.dequantize(), q.dequantize(), err_msg=name)
        assert p.bits_per_weight == q.bits_per_weight
        assert sorted(p.tensors()) == sorted(q.tensors())
        for k, t in q.tensors().items():
            assert p.tensors()[k].dtype == t.dtype and np.array_equal(p.tensors()[k], t)
        np.testing.assert_array_equal(
            p.dequantize(), decode_uniform_ref(p.tensors(), qc["layers"][name]), err_msg=name)
        if "perm" in p.tensors():
            perm = p.tensors()["perm"].astype(np.int64)
            # GPTQ's act_order: columns by decreasing diag(H), ties in index order
            np.testing.assert_array_equal(perm,
                                          np.argsort(-np.diag(hessians[name]), kind="stable"))
            perms += not np.array_equal(perm, np.arange(q.shape[1]))
        assert ("qzeros" in p.tensors()) == (not config.get("sym", False))
    # act_order with (non-static) groups stores the processing order, and it is not trivial
    stores_perm = config.get("act_order", False) and not config.get("static_groups", False)
    assert (perms > 0) == stores_perm
    ids = windows[0]
    np.testing.assert_array_equal(load_packed_model(out).forward(ids), model.forward(ids))


def test_save_packed_is_byte_reproducible(tmp_path, tiny, reference):
    """Saving the same model again gives the same bytes (nothing hash-ordered, no times)."""
    from refq.checkpoint import save_packed
    got, qmodel = reference
    quantized = {n: q for n, (q, _) in got.items()}
    blobs = set()
    for k in range(8):
        out = str(tmp_path / f"p{k}")
        save_packed(out, tiny["folder"], qmodel, quantized, {"method": "gptq"})
        with open(os.path.join(out, "model.safetensors"), "rb") as a, \
                open(os.path.join(out, "config.json"), "rb") as b:
            blobs.add((a.read(), b.read()))
    assert len(blobs) == 1


def ref_rtn(W, bits, group_size, sym):
    """RTN written from the grid's definition (GPTQ quant.py convention): (out, in) float32."""
    W = W.astype(np.float64)
    maxq = 2 ** bits - 1
    out, n = W.shape
    g = group_size or n
    Q = np.empty((out, n), np.float32)
    for c0 in range(0, n, g):
        x = W[:, c0:c0 + g]
        lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = np.where(lo < 0, -hi, lo)
        zero_range = (lo == 0) & (hi == 0)
        lo[zero_range], hi[zero_range] = -1, 1
        s16 = ((hi - lo) / maxq).astype(np.float16)               # stored scale
        s = np.maximum(s16.astype(np.float64), 2.0 ** -24)
        z = np.full(out, 2.0 ** (bits - 1)) if sym else np.clip(np.rint(-lo / s), 0, maxq)
        q = np.clip(np.rint(x / s[:, None]) + z[:, None], 0, maxq)
        Q[:, c0:c0 + g] = s.astype(np.float32)[:, None] * (q - z[:, None]).astype(np.float32)
    return Q


@pytest.mark.parametrize("args,bits,group_size,sym", [
    (["--bits", "4", "--sym"], 4, None, True),              # group_size default: per output row
    (["--bits", "3", "--group-size", "8"], 3, 8, False),
    (["--bits", "2", "--group-size", "none", "--no-sym"], 2, None, False),
])
def test_rtn_cli_matches_numpy_reference(tmp_path, tiny, capsys, args, bits, group_size, sym):
    from refq.checkpoint import load_packed
    out = str(tmp_path / "rtn")
    rc, stdout, err = cli(capsys, "quantize", "--model", tiny["folder"], "--method", "rtn",
                          *args, "--calib", tiny["calib"], "--nsamples", "4", "--seqlen", "16",
                          "--out", out, "--json")
    assert rc == 0, err
    js = json.loads(stdout)
    assert js["options"] == {"bits": bits, "group_size": group_size, "sym": sym, "mse": False}
    _, _, qc, qws = load_packed(out)
    assert qc["method"] == "rtn"
    for row in js["layers"]:
        name = row["name"]
        q = qws[name]
        W = tiny["W"][name + ".weight"]
        np.testing.assert_array_equal(q.dequantize(), ref_rtn(W, bits, group_size, sym),
                                      err_msg=name)
        assert ("qzeros" in q.tensors()) == (not sym)
        out_f, in_f = W.shape
        G = -(-in_f // (group_size or in_f))
        nbytes = out_f * (-(-in_f * bits // 8)) + 2 * out_f * G
        if not sym:
            nbytes += -(-out_f * G * bits // 8)
        assert row["bits_per_weight"] == 8 * nbytes / (out_f * in_f), name


# =========================================================================== --out and --force
def test_out_exists_needs_force(tiny, capsys):
    out = os.path.join(tiny["base"], "out-existing")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("mine")
    base = ["quantize", "--model", tiny["folder"], "--method", "rtn", "--calib", tiny["calib"],
            "--nsamples", "4", "--seqlen", "16", "--out", out]
    assert_one_line_error(*cli(capsys, *base), "--out", out, "--force")
    assert os.listdir(out) == ["keep.txt"]
    # --force replaces only a folder refq wrote (issue 15): not the user's keep.txt
    assert_one_line_error(*cli(capsys, *base, "--force"), "--out", out, "not a folder refq wrote")
    assert os.listdir(out) == ["keep.txt"]
    os.remove(os.path.join(out, "keep.txt"))
    rc, _, err = cli(capsys, *base)
    assert rc == 0, err
    rc, _, err = cli(capsys, *base, "--force")       # a refq checkpoint: replaced
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [f for f in os.listdir(tiny["base"]) if ".tmp-" in f or ".old-" in f]


def test_out_empty_folder_is_fine(tiny, capsys):
    out = os.path.join(tiny["base"], "out-empty")
    os.makedirs(out)
    rc, _, err = cli(capsys, "quantize", "--model", tiny["folder"], "--method", "rtn",
                     "--calib", tiny["calib"], "--nsamples", "4", "--seqlen", "16", "--out", out)
    assert rc == 0, err
    assert "model.safetensors" in os.listdir(out)


# =========================================================================== bad input
def test_bad_input_subprocess(runs):
    for case, names in (("nan", ["model.layers.1.mlp.up_proj", "NaN"]),
                        ("bits9", ["--bits", "9"])):
        r, out = runs[case]
        assert_one_line_error(r.returncode, r.stdout, r.stderr, "refq quantize", *names)
        assert_nothing_written(out)


BAD = {   # case -> (arguments after the common ones, strings the one line must hold)
    "unknown-method": (["--method", "frob"], ["--method", "frob"]),
    "bits-9": (["--method", "gptq", "--bits", "9"], ["--bits", "9"]),
    "bits-1": (["--method", "rtn", "--bits", "1"], ["--bits", "1"]),
    "bits-not-int": (["--method", "rtn", "--bits", "3.5"], ["--bits"]),
    "rtn-act-order": (["--method", "rtn", "--act-order"], ["--act-order", "rtn"]),
    "rtn-percdamp": (["--method", "rtn", "--percdamp", "0.1"], ["--percdamp", "rtn"]),
    "group-size-neg": (["--method", "rtn", "--group-size", "-5"], ["--group-size", "-5"]),
    "group-size-word": (["--method", "rtn", "--group-size", "abc"], ["--group-size", "abc"]),
    "percdamp-nan": (["--method", "gptq", "--percdamp", "nan"], ["--percdamp"]),
    "blocksize-0": (["--method", "gptq", "--blocksize", "0"], ["--blocksize"]),
    "static-no-groups": (["--method", "gptq", "--static-groups"], ["static_groups"]),
    "nsamples-1000": (["--method", "rtn", "--nsamples", "1000"],
                      [f"{N_CALIB} tokens", "--nsamples 1000", "--seqlen 16", "16000"]),
    "seqlen-1": (["--method", "rtn", "--seqlen", "1"], ["--seqlen 1"]),
    "calib-missing": (["--method", "rtn", "--calib", "NOFILE"], ["--calib", "NOFILE"]),
    "eval-text-missing": (["--method", "rtn", "--eval", "--eval-text", "NOFILE"],
                          ["--eval-text", "NOFILE"]),
    "model-missing": (["--method", "rtn", "--model", "NOFILE"], ["--model", "NOFILE"]),
    "nan-weight": (["--method", "rtn", "--model", "NAN"], ["model.layers.1.mlp.up_proj"]),
    "model-is-packed": (["--method", "rtn", "--model", "PACKED"], ["--model", "packed"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, tiny, main_run, capsys):
    extra, names = BAD[case]
    missing = os.path.join(tiny["base"], "no-such-file")
    sub = {"NOFILE": missing, "NAN": tiny["nan"], "PACKED": main_run[1]}
    extra = [sub.get(a, a) for a in extra]
    names = [sub.get(s, s) for s in names]
    out = os.path.join(tiny["base"], f"out-bad-{case}")
    args = ["quantize", "--model", tiny["folder"], "--calib", tiny["calib"],
            "--nsamples", "4", "--seqlen", "16", *extra, "--out", out]
    assert_one_line_error(*cli(capsys, *args), "refq", *names)
    assert_nothing_written(out)


# =========================================================================== corrupt checkpoints
def _corrupt(src, dst, how):
    shutil.copytree(src, dst)
    st, cfg = os.path.join(dst, "model.safetensors"), os.path.join(dst, "config.json")
    target = "model.layers.1.mlp.up_proj"
    if how == "truncated":
        with open(st, "r+b") as f:
            f.truncate(os.path.getsize(st) - 100)
        return ["model.safetensors", "truncated"]
    if how == "format-version-99":
        with open(cfg) as f:
            c = json.load(f)
        c["quantization_config"]["format_version"] = 99
        with open(cfg, "w") as f:
            json.dump(c, f)
        return ["config.json", "format_version", "99"]
    if how == "config-not-json":
        with open(cfg, "w") as f:
            f.write('{"quantization_config": ')
        return ["config.json"]
    if how == "layer-meta-missing":
        with open(cfg) as f:
            c = json.load(f)
        del c["quantization_config"]["layers"][target]
        with open(cfg, "w") as f:
            json.dump(c, f)
        return [target]
    t = load_file(st)
    if how == "qweight-wrong-shape":
        q = t[target + ".qweight"]
        t[target + ".qweight"] = np.zeros((q.shape[0] - 1, q.shape[1]), np.uint8)
        save_file(t, st)
        return [target, "qweight"]
    if how == "qweight-missing":
        del t[target + ".qweight"]
        save_file(t, st)
        return [target, "qweight"]
    if how == "scales-wrong-dtype":
        t[target + ".scales"] = t[target + ".scales"].astype(np.float32)
        save_file(t, st)
        return [target, "scales"]
    raise ValueError(how)


CORRUPT = ["truncated", "format-version-99", "config-not-json", "layer-meta-missing",
           "qweight-wrong-shape", "qweight-missing", "scales-wrong-dtype"]


@pytest.mark.parametrize("how", CORRUPT)
@pytest.mark.parametrize("command", ["eval", "info"])
def test_corrupt_packed_checkpoint(main_run, tiny, tmp_path, capsys, how, command):
    d = str(tmp_path / "broken")
    names = _corrupt(main_run[1], d, how)
    args = (["eval", "--model", d, "--text", tiny["eval"]] if command == "eval"
            else ["info", d])
    assert_one_line_error(*cli(capsys, *args), f"refq {command}", *names)


def test_corrupt_packed_checkpoint_subprocess(main_run, tiny, tmp_path):
    d = str(tmp_path / "broken")
    names = _corrupt(main_run[1], d, "qweight-wrong-shape")
    r = run_cli(["eval", "--model", d, "--text", tiny["eval"]], tiny["home"])
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "refq eval", *names)


# =========================================================================== crashes
def test_crash_while_quantizing_leaves_nothing(tiny, capsys, monkeypatch):
    import refq.api
    real, calls = refq.api.quantize_weight, [0]

    def flaky(*a, **kw):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(refq.api, "quantize_weight", flaky)
    out = os.path.join(tiny["base"], "out-crash-q")
    with pytest.raises(RuntimeError, match="boom"):
        cli(capsys, "quantize", "--model", tiny["folder"], *GPTQ_ARGS, "--calib", tiny["calib"],
            "--out", out)
    assert calls[0] == 5
    assert_nothing_written(out)


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_while_saving_keeps_old_output(tiny, capsys, monkeypatch, exc):
    """A failure while the folder is written: no temp folder left, and with --force
    the previous output is still there (it is replaced only by the final rename)."""
    import refq.checkpoint
    out = os.path.join(tiny["base"], f"out-crash-save-{type(exc).__name__}")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("previous")
    with open(os.path.join(out, "config.json"), "w") as f:   # refq's marker: --force may replace it
        json.dump({"quantization_config": {"quant_method": "refq"}}, f)
    seen = {}

    def broken_copy(src, dst, *a, **kw):
        seen["tmp"] = os.path.dirname(dst)
        seen["files"] = sorted(os.listdir(os.path.dirname(dst)))
        raise exc

    monkeypatch.setattr(refq.checkpoint.shutil, "copyfile", broken_copy)
    args = ["quantize", "--model", tiny["folder"], "--method", "rtn", "--calib", tiny["calib"],
            "--nsamples", "4", "--seqlen", "16", "--out", out, "--force"]
    if isinstance(exc, KeyboardInterrupt):
        rc, _, err = cli(capsys, *args)
        assert rc == 130 and "interrupted" in err
    else:
        with pytest.raises(OSError, match="disk full"):
            cli(capsys, *args)
    assert seen["files"] == ["config.json", "model.safetensors"]   # it did get that far
    assert not os.path.exists(seen["tmp"])
    assert sorted(os.listdir(out)) == ["config.json", "keep.txt"]
    assert not [f for f in os.listdir(tiny["base"]) if ".tmp-" in f]


def test_refq_error_type_for_user_errors():
    # the API raises RefqError (what the CLI turns into exit code 2)
    import refq
    with pytest.raises(RefqError, match="bits"):
        refq.quantize_weight(np.zeros((2, 8), np.float32), np.eye(8), "rtn", bits=9)
