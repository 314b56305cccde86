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
    """refq.cli.main in-process -> (exit code, stdout, stderr)."""
    from refq.cli import main
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


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
    """SIGTERM and SIGINT clean up on the way out (and say so); SIGKILL leaves
    `.NAME.tmp-PID`, which the next run on the same output removes."""
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
        assert not os.path.exists(outs[s]) and not leftovers(outs[s]), (s, leftovers(outs[s]))
        RESULTS.append((f"{s} during save", "clean"))
    r = res["SIGKILL"]
    assert r.returncode == -signal.SIGKILL
    left = leftovers(outs["SIGKILL"])
    assert len(left) == 1 and ".tmp-" in left[0]          # the scenario happened
    rc, o, err = cli(capsys, *quantize_args(tiny, outs["SIGKILL"]))
    assert rc == 0, err
    assert left[0] in err and not leftovers(outs["SIGKILL"])
    RESULTS.append(("SIGKILL during save, next run", "clean"))


# =========================================================================== totals
def test_zz_totals(capsys):
    """Prints the matrix's totals (README.md "Reliability" records them). Runs last."""
    from collections import Counter
    c = Counter(o for _, o in RESULTS)
    with capsys.disabled():
        print(f"\nreliability matrix: {len(RESULTS)} cases, {c['clean']} clean errors, "
              f"{c['traceback']} tracebacks, {c['silent']} silent acceptances, "
              f"{c['leftover']} leftovers, {c['unnamed']} without the culprit on one line")
