"""The reliability matrix: every bad input refq meets, and what it must do.

Each case asserts what the README promises for bad input:
  * exit code 2 and exactly one line on stderr, no traceback, naming the
    culprit (file, field, tensor or option);
  * nothing left at or beside --out (no folder, no `.NAME.tmp-PID`);
  * the inputs untouched (every file of the input folders hashed before and after).

Classes are generalised rather than sampled: every config.json field llama_np
reads with every wrong type, every safetensors header field with every wrong
type, each signal during a save. Most cases call refq.cli.main in-process
(fast); the signal cases that must kill a process run in subprocesses.

The totals of this matrix are recorded in README.md ("Reliability").
"""
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_text, write_tiny_checkpoint

N_CALIB = 300
QUANT = ["--method", "rtn", "--bits", "4", "--group-size", "16", "--nsamples", "4",
         "--seqlen", "16"]


# =========================================================================== helpers
def tree_hash(path):
    """{relative path: sha256 of the file (or 'dir')} of everything under path."""
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for d, dirs, files in os.walk(path):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), path)] = "dir"
        for n in files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def cli(capsys, *args):
    """refq.cli.main in-process -> (exit code, stdout, stderr). An exception that
    escapes main is what a user sees as a traceback (exit 1): returned as such."""
    import traceback
    from refq.cli import main
    capsys.readouterr()
    tb = ""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    except Exception:
        rc, tb = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    return rc, out, err + tb


def leftovers(out):
    parent, base = os.path.split(os.path.abspath(out))
    return [f for f in os.listdir(parent) if f.startswith(f".{base}.")] if os.path.isdir(parent) else []


RESULTS = []     # (case, outcome) of every matrix case, for the totals in README.md


def assert_clean_error(rc, out, err, names, outdir=None, inputs=(), before=None, case=""):
    """The promise for a bad input; records the outcome before asserting it."""
    lines = err.strip().splitlines()
    if "Traceback" in err or rc not in (0, 2):
        outcome = "traceback"
    elif rc == 0:
        outcome = "silent"
    elif outdir is not None and (os.path.lexists(outdir) or leftovers(outdir)):
        outcome = "leftover"
    elif len(lines) != 1 or not all(s in lines[0] for s in names):
        outcome = "unnamed"          # several lines, or the culprit not named
    else:
        outcome = "clean"
    RESULTS.append((case, outcome))
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for s in names:
        assert s in lines[0], (s, lines[0])
    if outdir is not None:
        assert not os.path.lexists(outdir), outdir
        assert not leftovers(outdir), leftovers(outdir)
    if before is not None:
        assert {p: tree_hash(p) for p in inputs} == before, "an input was modified"
    return lines[0]


# =========================================================================== fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("rel"))
    folder = os.path.join(base, "tiny")
    write_tiny_checkpoint(folder)
    rng = np.random.default_rng(3)
    calib = os.path.join(base, "calib.txt")
    with open(calib, "w") as f:
        f.write(tiny_text(rng.integers(2, 64, size=N_CALIB)) + "\n")
    return dict(base=base, folder=folder, calib=calib)


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if calibration starts: the check must come before any work."""
    import refq.calibrate

    def boom(*a, **k):
        raise AssertionError("calibration started before the output was checked")
    monkeypatch.setattr(refq.calibrate, "calibration_windows", boom)


def quantize_args(tiny, out, *extra):
    return ["quantize", "--model", tiny["folder"], *QUANT, "--calib", tiny["calib"],
            "--out", out, *extra]


def user_folder(path, n=3):
    """A folder of the user's own files (not written by refq)."""
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        with open(os.path.join(path, f"notes{i}.txt"), "w") as f:
            f.write(f"precious {i}\n")
    return path


# =========================================================================== 1. data loss
def test_out_dot_force_is_refused_and_touches_nothing(tiny, tmp_path, capsys, monkeypatch,
                                                     no_calibration):
    cwd = user_folder(str(tmp_path / "work"))
    monkeypatch.chdir(cwd)
    before = {p: tree_hash(p) for p in (cwd, tiny["folder"])}
    rc, out, err = cli(capsys, *quantize_args(tiny, ".", "--force"))
    assert_clean_error(rc, out, err, ["--out .", "current folder"], case="out=. --force",
                       inputs=(cwd, tiny["folder"]), before=before)


@pytest.mark.parametrize("which", ["model", "parent-of-model", "calib-parent"])
def test_out_holding_an_input_is_refused(tiny, tmp_path, capsys, which, no_calibration):
    out = {"model": tiny["folder"], "parent-of-model": tiny["base"],
           "calib-parent": os.path.dirname(tiny["calib"])}[which]
    before = {p: tree_hash(p) for p in (tiny["folder"], tiny["calib"])}
    rc, o, err = cli(capsys, *quantize_args(tiny, out, "--force"))
    assert_clean_error(rc, o, err, [f"--out {out}", "input"], case=f"out={which} --force",
                       inputs=(tiny["folder"], tiny["calib"]), before=before)


def test_out_root_and_home_are_refused(tiny, tmp_path, capsys, monkeypatch, no_calibration):
    home = user_folder(str(tmp_path / "home"))
    monkeypatch.setenv("HOME", home)
    before = tree_hash(home)
    for out, word in (("/", "root"), (home, "home"), ("~", "home")):
        rc, o, err = cli(capsys, *quantize_args(tiny, out, "--force"))
        assert_clean_error(rc, o, err, [f"--out {out}", word], case=f"out={word} --force")
    assert tree_hash(home) == before


def test_force_only_replaces_a_folder_refq_wrote(tiny, tmp_path, capsys, no_calibration):
    mine = user_folder(str(tmp_path / "results"))
    before = tree_hash(mine)
    rc, o, err = cli(capsys, *quantize_args(tiny, mine, "--force"))
    assert_clean_error(rc, o, err, [f"--out {mine}", "not a folder refq wrote",
                                    "quantization_config"], case="--force on a user folder")
    assert tree_hash(mine) == before
    # a folder with a config.json that is not refq's (a copy of an HF model) neither
    import shutil
    hf = str(tmp_path / "hf-copy")
    shutil.copytree(tiny["folder"], hf)
    before = tree_hash(hf)
    rc, o, err = cli(capsys, *quantize_args(tiny, hf, "--force"))
    assert_clean_error(rc, o, err, [f"--out {hf}", "not a folder refq wrote"],
                       case="--force on an HF model folder")
    assert tree_hash(hf) == before
    # nor a GPTQ / AQLM checkpoint made by another tool (refq reads those, it did not write them)
    for method in ("gptq", "aqlm"):
        foreign = str(tmp_path / f"{method}-ckpt")
        shutil.copytree(tiny["folder"], foreign)
        cfg_path = os.path.join(foreign, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = {"quant_method": method, "bits": 4}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        before = tree_hash(foreign)
        rc, o, err = cli(capsys, *quantize_args(tiny, foreign, "--force"))
        assert_clean_error(rc, o, err, [f"--out {foreign}", "not a folder refq wrote"],
                           case=f"--force on a {method} checkpoint")
        assert tree_hash(foreign) == before


def test_force_replaces_a_refq_checkpoint_and_leftovers_are_removed(tiny, tmp_path, capsys):
    from refq.loading import is_packed
    out = str(tmp_path / "q")
    rc, o, err = cli(capsys, *quantize_args(tiny, out))
    assert rc == 0, err
    first = tree_hash(out)
    # leftovers of a killed run (dead pid) beside it; one of a live process is kept
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name, pid in ((f".q.tmp-{dead.pid}", dead.pid), (f".q.old-{dead.pid}", dead.pid),
                          (f".q.tmp-{live.pid}", live.pid)):
            user_folder(str(tmp_path / name), 1)
        rc, o, err = cli(capsys, *quantize_args(tiny, out, "--force"))
        assert rc == 0, err
        assert is_packed(out) and tree_hash(out) == first          # same bytes again
        assert sorted(leftovers(out)) == [f".q.tmp-{live.pid}"]
        assert f".q.tmp-{dead.pid}" in err and "interrupted run" in err
        assert f"running process {live.pid}" in err
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("where", ["under-a-file", "proc", "empty", "file"])
def test_out_not_creatable_is_refused_before_calibration(tiny, tmp_path, capsys, where,
                                                         no_calibration):
    f = tmp_path / "a-file"
    f.write_text("x")
    out = {"under-a-file": str(f / "q"), "proc": "/proc/refq-test/q", "empty": "",
           "file": str(f)}[where]
    rc, o, err = cli(capsys, *quantize_args(tiny, out))
    name = {"empty": "--out ''"}.get(where, f"--out {out}")
    assert_clean_error(rc, o, err, [name], case=f"out {where}")
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(tiny, tmp_path, capsys, no_calibration):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, o, err = cli(capsys, *quantize_args(tiny, str(ro / "q")))
        assert_clean_error(rc, o, err, [f"--out {ro / 'q'}", "cannot create"], case="out read-only")
    finally:
        ro.chmod(0o755)


def test_golden_write_and_compare_refuse_the_same_outputs(tiny, tmp_path, capsys, monkeypatch):
    cwd = user_folder(str(tmp_path / "work"))
    monkeypatch.chdir(cwd)
    before = tree_hash(cwd)
    rc, o, err = cli(capsys, "golden", "write", ".", "--force", "--no-real", "--methods", "rtn")
    assert_clean_error(rc, o, err, ["golden write .", "current folder"], case="golden write .")
    mine = user_folder(str(tmp_path / "mine"))
    rc, o, err = cli(capsys, "golden", "write", mine, "--force", "--no-real", "--methods", "rtn")
    assert_clean_error(rc, o, err, [mine, "manifest.json"], case="golden write --force user folder")
    rc, o, err = cli(capsys, "compare", "--model", tiny["folder"], "--calib", tiny["calib"],
                     "--text", tiny["calib"], "--methods", "rtn", "--out", ".", "--force")
    assert_clean_error(rc, o, err, ["--out .", "current folder"], case="compare --out .")
    assert tree_hash(cwd) == before
    # compare --force removes a SPEC's folder only if it holds nothing but what compare wrote
    res = str(tmp_path / "res")
    user_folder(os.path.join(res, "rtn"), 1)
    before = tree_hash(res)
    rc, o, err = cli(capsys, "compare", "--model", tiny["folder"], "--calib", tiny["calib"],
                     "--text", tiny["calib"], "--methods", "rtn", "--no-baseline", "--out", res,
                     "--force")
    assert_clean_error(rc, o, err, [f"--out {res}", "rtn", "did not write"],
                       case="compare --force on a SPEC folder with user files")
    assert tree_hash(res) == before


# --------------------------------------------------------------------------- signals
_DRIVER = r"""
import os, signal, sys
import safetensors.numpy as st
real = st.save_file
def save_then_signal(*a, **k):           # the checkpoint is being saved: signal now
    real(*a, **k)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
st.save_file = save_then_signal
from refq.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _signal_run(sig, args, home):
    env = dict(os.environ, REFQ_HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", _DRIVER, sig, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_signals_during_save(tiny, tmp_path, capsys):
    """SIGTERM and SIGINT clean up the half-written checkpoint on the way out (and say
    so), keeping only the resume state of the finished layers (refq/resume.py), which they
    name; SIGKILL leaves `.NAME.tmp-PID` too, which the next run on the same output
    removes. The next run resumes, and leaves nothing beside --out."""
    from concurrent.futures import ThreadPoolExecutor
    outs = {s: str(tmp_path / f"q-{s}") for s in ("SIGTERM", "SIGINT", "SIGKILL")}
    with ThreadPoolExecutor(3) as ex:
        futs = {s: ex.submit(_signal_run, s, quantize_args(tiny, o), tmp_path)
                for s, o in outs.items()}
        res = {s: f.result() for s, f in futs.items()}
    for s, code, word in (("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")):
        r = res[s]
        assert r.returncode == code, (s, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].endswith(word)
        state = f".q-{s}.refq-resume"
        assert not os.path.exists(outs[s]) and leftovers(outs[s]) == [state], \
            (s, leftovers(outs[s]))
        assert state in r.stderr and "continues" in r.stderr
        rc, o, err = cli(capsys, *quantize_args(tiny, outs[s]))      # resumes, then cleans up
        assert rc == 0, err
        assert os.path.isdir(outs[s]) and not leftovers(outs[s]), (s, leftovers(outs[s]))
        RESULTS.append((f"{s} during save", "clean"))
    r = res["SIGKILL"]
    assert r.returncode == -signal.SIGKILL
    left = sorted(leftovers(outs["SIGKILL"]), key=lambda f: ".tmp-" not in f)   # tmp first
    assert len(left) == 2 and ".tmp-" in left[0] and left[1].endswith(".refq-resume"), left
    rc, o, err = cli(capsys, *quantize_args(tiny, outs["SIGKILL"]))
    assert rc == 0, err
    assert left[0] in err and not leftovers(outs["SIGKILL"])
    RESULTS.append(("SIGKILL during save, next run", "clean"))


# =========================================================================== 2. config.json
def _bad_values(kind, nullable):
    """Values of the wrong type or range for a FIELDS kind (llama_np/config.py)."""
    if isinstance(kind, tuple):
        return ["gpt2" if kind != ("silu",) else "gelu", 1, [], None]
    bad = {"int>0": ["2", 2.5, True, 0, -1, [], {}],
           "int>=0": ["2", 2.5, True, -1, []],
           "number>0": ["abc", True, 0, -1.0, float("nan"), float("inf"), [], {}],
           "bool": ["yes", 1, 0.0, [], {}],
           "object": ["yes", 1, [], True],
           "int>=0 list": ["2", 2.5, True, -1, [1, "x"], [-1], {}]}[kind]
    return bad if nullable else bad + [None]


# Every config.json field llama_np reads, with the values it can compute with, written
# here from Hugging Face's config documentation (not imported from llama_np/config.py;
# test_the_field_list_matches_the_reader checks the two lists name the same keys).
# (key, kind, nullable)
CONFIG_FIELDS = [
    ("model_type", ("llama", "mistral", "qwen2"), False),
    ("vocab_size", "int>0", False), ("hidden_size", "int>0", False),
    ("intermediate_size", "int>0", False), ("num_hidden_layers", "int>0", False),
    ("num_attention_heads", "int>0", False), ("num_key_value_heads", "int>0", True),
    ("head_dim", "int>0", True), ("rms_norm_eps", "number>0", False),
    ("rope_theta", "number>0", False), ("rope_parameters", "object", True),
    ("rope_scaling", "object", True), ("tie_word_embeddings", "bool", False),
    ("attention_bias", "bool", False), ("max_position_embeddings", "int>0", False),
    ("bos_token_id", "int>=0", True), ("eos_token_id", "int>=0 list", True),
    ("hidden_act", ("silu",), False), ("mlp_bias", "bool", False),
]
SCALING_FIELDS = [("factor", "number>0"), ("low_freq_factor", "number>0"),
                  ("high_freq_factor", "number>0"), ("original_max_position_embeddings", "int>0")]


def _config_cases():
    cases = []
    for key, kind, nullable in CONFIG_FIELDS:
        cases += [(key, v) for v in _bad_values(kind, nullable)]
    for key, kind in SCALING_FIELDS:           # inside a llama3 rope_scaling
        cases += [(f"rope_scaling.{key}", v) for v in _bad_values(kind, False)]
    return cases


def test_the_field_list_matches_the_reader():
    from llama_np import config
    assert sorted(k for k, _, _ in CONFIG_FIELDS) == sorted(f[0] for f in config.FIELDS)
    assert sorted(k for k, _ in SCALING_FIELDS) == sorted(f[0] for f in config.SCALING_FIELDS)


CONFIG_CASES = _config_cases()


@pytest.fixture(scope="module")
def scratch(tiny, tmp_path_factory):
    """A copy of the tiny model whose files a case may break (restored after each)."""
    import shutil
    d = str(tmp_path_factory.mktemp("scratch") / "m")
    shutil.copytree(tiny["folder"], d)
    return d


@pytest.fixture
def fresh(scratch):
    import shutil
    keep = {n: open(os.path.join(scratch, n), "rb").read() for n in os.listdir(scratch)}
    yield scratch
    for n in os.listdir(scratch):
        if n not in keep:
            os.remove(os.path.join(scratch, n))
    for n, b in keep.items():
        with open(os.path.join(scratch, n), "wb") as f:
            f.write(b)


def _edit_config(folder, key, value):
    path = os.path.join(folder, "config.json")
    d = json.load(open(path))
    if key.startswith("rope_scaling."):
        d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        d["rope_scaling"][key.split(".", 1)[1]] = value
    else:
        d[key] = value
    with open(path, "w") as f:
        json.dump(d, f)           # NaN / Infinity as Python's json writes and reads them


@pytest.mark.parametrize("key, value", CONFIG_CASES,
                         ids=[f"{k}={v!r}" for k, v in CONFIG_CASES])
def test_config_field_of_wrong_type_or_range(fresh, capsys, key, value):
    _edit_config(fresh, key, value)
    before = {fresh: tree_hash(fresh)}
    rc, o, err = cli(capsys, "eval", "--model", fresh, "--text", os.path.join(fresh, "config.json"))
    assert_clean_error(rc, o, err, ["config.json", key.split(".")[-1]],
                       case=f"config {key}={value!r}", inputs=(fresh,), before=before)


@pytest.mark.parametrize("key, value, names", [
    ("num_key_value_heads", 3, ["num_key_value_heads"]),       # 4 heads not a multiple of 3
    ("head_dim", 7, ["head_dim", "even"]),
    ("hidden_size", 30, ["hidden_size"]),                      # 30 / 4 heads, no head_dim
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, ["yarn"]),
    ("rope_scaling", {"rope_type": "linear"}, ["factor"]),
    ("rope_scaling.high_freq_factor", 0.5, ["high_freq_factor"]),
    ("model_type", "gpt2", ["gpt2"]),
])
def test_config_cross_field_rules(fresh, capsys, key, value, names):
    _edit_config(fresh, key, value)
    rc, o, err = cli(capsys, "eval", "--model", fresh, "--text", os.path.join(fresh, "config.json"))
    assert_clean_error(rc, o, err, ["config.json", *names], case=f"config {key}={value!r}")


# =========================================================================== 2. safetensors
def _rewrite_header(path, edit):
    """Apply edit(header dict) to a safetensors file's JSON header, keep its data."""
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    edit(header)
    hb = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)


T = "model.norm.weight"
HEADER_CASES = (
    [("dtype", v) for v in (5, ["F32"], None, "F99", {})]
    + [("shape", v) for v in (["2", "16"], "32", [2.5], [-32], [True], None, 32, [[32]])]
    + [("data_offsets", v) for v in (["0", "128"], [0], 5, "0-128", [128, 0], [-4, 124],
                                     [0.0, 128.0], None, [True, 128])]
    + [("entry", v) for v in ("x", [], None, 7)]
    + [("missing", k) for k in ("dtype", "shape", "data_offsets")]
    + [("__metadata__", v) for v in ("x", [1], 5)]
)


@pytest.mark.parametrize("field, value", HEADER_CASES,
                         ids=[f"{f}={v!r}" for f, v in HEADER_CASES])
def test_safetensors_header_field_of_wrong_type(fresh, capsys, field, value):
    st = os.path.join(fresh, "model.safetensors")

    def edit(h):
        if field == "entry":
            h[T] = value
        elif field == "missing":
            del h[T][value]
        elif field == "__metadata__":
            h["__metadata__"] = value
        else:
            h[T][field] = value
    _rewrite_header(st, edit)
    before = {fresh: tree_hash(fresh)}
    rc, o, err = cli(capsys, "eval", "--model", fresh, "--text", os.path.join(fresh, "config.json"))
    names = ["model.safetensors"] + ([] if field == "__metadata__" else [T])
    assert_clean_error(rc, o, err, names, case=f"safetensors {field}={value!r}",
                       inputs=(fresh,), before=before)


WEIGHT_MAP_CASES = [5, None, ["model.safetensors"], "../model.safetensors", "/etc/passwd", "", {}]


@pytest.mark.parametrize("value", WEIGHT_MAP_CASES + ["map-not-object"],
                         ids=[repr(v) for v in WEIGHT_MAP_CASES] + ["map-not-object"])
def test_sharded_index_weight_map_values(fresh, capsys, value):
    from safetensors.numpy import load_file
    names = list(load_file(os.path.join(fresh, "model.safetensors")))
    wm = {n: "model.safetensors" for n in names}
    if value == "map-not-object":
        wm = list(wm)
    else:
        wm[T] = value
    with open(os.path.join(fresh, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": wm}, f)
    rc, o, err = cli(capsys, "eval", "--model", fresh, "--text", os.path.join(fresh, "config.json"))
    assert_clean_error(rc, o, err, ["model.safetensors.index.json", "weight_map"],
                       case=f"index weight_map {value!r}")


# =========================================================================== 2. tokenizer, numbers
def test_tokenizer_ids_beyond_the_vocab(fresh, capsys, tmp_path):
    from conftest import write_tiny_tokenizer
    write_tiny_tokenizer(fresh, 100)              # ids up to 99; the model has 64 rows
    text = tmp_path / "t.txt"
    text.write_text("w3 w4 w80 w5 w6")
    rc, o, err = cli(capsys, "eval", "--model", fresh, "--text", text)
    assert_clean_error(rc, o, err, [f"--text {text}", "tokenizer.json", "80", "vocab_size 64"],
                       case="eval: token id beyond vocab")
    rc, o, err = cli(capsys, "generate", "--model", fresh, "--prompt", "w3 w90")
    assert_clean_error(rc, o, err, ["--prompt", "90", "vocab_size 64"],
                       case="generate: token id beyond vocab")
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(["w3 w70"] * 200))
    out = str(tmp_path / "q")
    rc, o, err = cli(capsys, "quantize", "--model", fresh, *QUANT, "--calib", calib, "--out", out)
    assert_clean_error(rc, o, err, [f"--calib {calib}", "70"], outdir=out,
                       case="quantize: calib token id beyond vocab")


NUMBER_CASES = [
    (["generate", "--seed", "-1"], "--seed -1"),
    (["generate", "--temperature", "nan"], "--temperature nan"),
    (["generate", "--temperature", "inf"], "--temperature inf"),
    (["generate", "--temperature", "-1"], "--temperature -1"),
    (["generate", "--top-p", "nan"], "--top-p nan"),
    (["generate", "--top-p", "0"], "--top-p 0"),
    (["generate", "--top-p", "1.5"], "--top-p 1.5"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["eval", "--ctx", "1"], "--ctx 1"),
    (["eval", "--max-tokens", "1"], "--max-tokens 1"),
    (["eval", "--ctx", "300"], "--ctx 300"),              # windows of 300 > 256 positions
    (["quantize", "--seed", "-1"], ["--seed", "got -1"]),   # argparse's usage error
    (["quantize", "--nsamples", "0"], "--nsamples 0"),
    (["quantize", "--seqlen", "1"], "--seqlen 1"),
    (["quantize", "--seqlen", "300"], "--seqlen 300"),    # > max_position_embeddings 256
    (["quantize", "--eval", "--eval-max-tokens", "1"], "--eval-max-tokens 1"),
]


@pytest.mark.parametrize("args, name", NUMBER_CASES, ids=[" ".join(a) for a, _ in NUMBER_CASES])
def test_numbers_out_of_range(tiny, tmp_path, capsys, args, name):
    out = str(tmp_path / "q")
    cmd, rest = args[0], args[1:]
    if cmd == "quantize":
        full = ["quantize", "--model", tiny["folder"], "--method", "rtn", "--calib", tiny["calib"],
                "--out", out, *rest]
    else:
        full = [cmd, "--model", tiny["folder"], *rest]
        if cmd == "eval":
            full += ["--text", tiny["calib"]]
    rc, o, err = cli(capsys, *full)
    assert_clean_error(rc, o, err, name if isinstance(name, list) else [name], outdir=out,
                       case=" ".join(args))


def test_generate_stops_at_max_position_embeddings(tiny, capsys):
    prompt = tiny_text([3 + i % 60 for i in range(250)])      # 250 of 256 positions
    rc, o, err = cli(capsys, "generate", "--model", tiny["folder"], "--prompt", prompt,
                     "--max-new-tokens", "40", "--temperature", "1", "--seed", "3")
    assert rc == 0, err
    # 250 prompt positions + 6 fed back = 256; the 7th new token is sampled, not fed
    assert "stopped after 7 new tokens at the model's max_position_embeddings 256" in err
    RESULTS.append(("generate beyond max_position_embeddings", "clean"))


# =========================================================================== 3. silently accepted
@pytest.fixture(scope="module")
def packed(tiny, tmp_path_factory):
    """A packed checkpoint of the tiny model (rtn 4-bit, groups of 16)."""
    from refq.cli import main
    out = str(tmp_path_factory.mktemp("packed") / "q")
    assert main(quantize_args(tiny, out)) == 0
    return out


@pytest.fixture
def packed_copy(packed, tmp_path):
    import shutil
    d = str(tmp_path / "p")
    shutil.copytree(packed, d)
    return d


def _poke(folder, name, fn):
    """Rewrite tensor `name` of folder/model.safetensors in place (bytes, same header)."""
    from llama_np.checkpoint import SafetensorsFile
    st = os.path.join(folder, "model.safetensors")
    f = SafetensorsFile(st)
    b, e = f.header[name]["data_offsets"]
    with open(st, "r+b") as fh:
        fh.seek(f.data_start + b)
        raw = bytearray(fh.read(e - b))
        fn(raw)
        fh.seek(f.data_start + b)
        fh.write(raw)


def test_nan_and_inf_weights_of_an_hf_folder(fresh, capsys):
    import struct
    _poke(fresh, "model.layers.1.mlp.up_proj.weight",
          lambda r: r.__setitem__(slice(8, 12), struct.pack("<f", float("nan"))))
    for cmd in (["eval", "--text", os.path.join(fresh, "config.json")], ["generate"]):
        rc, o, err = cli(capsys, cmd[0], "--model", fresh, *cmd[1:])
        assert_clean_error(rc, o, err, ["model.layers.1.mlp.up_proj.weight", "NaN"],
                           case=f"{cmd[0]}: NaN weight")
    _poke(fresh, "model.norm.weight",
          lambda r: r.__setitem__(slice(0, 4), struct.pack("<f", float("inf"))))
    rc, o, err = cli(capsys, "eval", "--model", fresh, "--text", os.path.join(fresh, "config.json"))
    assert_clean_error(rc, o, err, ["model.norm.weight"], case="eval: Inf weight")


def test_flipped_bytes_fail_the_sha256_and_nan_scales_fail_without_it(packed_copy, capsys):
    import struct
    from llama_np.checkpoint import SafetensorsFile
    names = SafetensorsFile(os.path.join(packed_copy, "model.safetensors")).header
    codes = next(n for n in names if n.startswith("model.layers.0.mlp.up_proj.") and "scale" not in n
                 and names[n]["dtype"] == "U8")
    scales = next(n for n in names if n.startswith("model.layers.1.self_attn.k_proj.")
                  and "scale" in n)
    text = os.path.join(packed_copy, "config.json")
    _poke(packed_copy, codes, lambda r: r.__setitem__(0, r[0] ^ 0x5A))
    rc, o, err = cli(capsys, "eval", "--model", packed_copy, "--text", text)
    assert_clean_error(rc, o, err, [codes, "sha256"], case="packed: flipped code bytes")
    rc, o, err = cli(capsys, "info", packed_copy)
    assert_clean_error(rc, o, err, [codes, "sha256"], case="info: flipped code bytes")
    # --no-verify skips the sha256; a NaN scale is still refused, by name
    nan = struct.pack("<e", float("nan")) if names[scales]["dtype"] == "F16" else \
        struct.pack("<f", float("nan"))
    _poke(packed_copy, scales, lambda r: r.__setitem__(slice(0, len(nan)), nan))
    rc, o, err = cli(capsys, "eval", "--model", packed_copy, "--text", text, "--no-verify")
    assert_clean_error(rc, o, err, [scales, "NaN"], case="packed: NaN scale (--no-verify)")


@pytest.mark.parametrize("edit, names", [
    (lambda q: q.update(method="gptq9"), ["gptq9", "method"]),
    (lambda q: q.update(method=None), ["method"]),
    (lambda q: q.update(options="x"), ["options"]),
    (lambda q: q.update(sha256=["x"]), ["sha256"]),
    (lambda q: q["sha256"].pop("model.norm.weight"), ["model.norm.weight", "sha256"]),
    (lambda q: q["sha256"].update({"model.extra": "0" * 64}), ["model.extra"]),
    (lambda q: q["layers"].update({"model.layers.0.mlp.up_proj": 5}), ["mlp.up_proj"]),
], ids=["unknown-method", "method-null", "options-str", "sha256-list", "sha256-missing-tensor",
        "sha256-extra-tensor", "layer-meta-int"])
def test_quantization_config_checked(packed_copy, capsys, edit, names):
    path = os.path.join(packed_copy, "config.json")
    d = json.load(open(path))
    edit(d["quantization_config"])
    json.dump(d, open(path, "w"))
    rc, o, err = cli(capsys, "eval", "--model", packed_copy, "--text", path)
    assert_clean_error(rc, o, err, names, case=f"quantization_config {names[0]}")


def test_a_checkpoint_without_sha256_still_loads(packed_copy, capsys):
    path = os.path.join(packed_copy, "config.json")
    d = json.load(open(path))
    del d["quantization_config"]["sha256"]
    json.dump(d, open(path, "w"))
    from refq.checkpoint import load_packed
    assert load_packed(packed_copy)[3]


def test_calib_too_short_and_spqr_group_size_name_the_culprit(tiny, tmp_path, capsys):
    calib = tmp_path / "one.txt"
    calib.write_text("w5")
    out = str(tmp_path / "q")
    rc, o, err = cli(capsys, *["quantize", "--model", tiny["folder"], *QUANT, "--calib", calib,
                               "--out", out])
    assert_clean_error(rc, o, err, [f"--calib {calib}", "1 tokens"], outdir=out,
                       case="--calib with 1 token")


def test_spqr_group_size_is_refused_before_calibration(tiny, tmp_path, capsys, no_calibration):
    out = str(tmp_path / "q")
    rc, o, err = cli(capsys, "quantize", "--model", tiny["folder"], "--method", "spqr",
                     "--group-size", "12", "--calib", tiny["calib"], "--out", out)
    assert_clean_error(rc, o, err, ["--group-size", "12", "in_features 32"], outdir=out,
                       case="spqr --group-size 12")


# =========================================================================== totals
def test_zz_totals(capsys):
    """Prints the matrix's totals (README.md "Reliability" records them). Runs last."""
    from collections import Counter
    c = Counter(o for _, o in RESULTS)
    with capsys.disabled():
        print(f"\nreliability matrix: {len(RESULTS)} cases, {c['clean']} clean errors, "
              f"{c['traceback']} tracebacks, {c['silent']} silent acceptances, "
              f"{c['leftover']} leftovers, {c['unnamed']} without the culprit on one line")
