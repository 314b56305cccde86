"""`--cluster` (refq/cluster.py): quantize and compare on a Dask cluster.

Independent truth: the single-process run.  The checkpoints written with a
cluster of 2 worker processes must be the same bytes as those written
without one (gptq, claq, aqlm), also when a worker process is killed while it
runs a task of decoder layer 1 (a worker plugin kills it, once).  The local
cluster that `--cluster local:N` starts must leave no process behind: every
process that inherited the run's environment marker is gone afterwards.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, assert_one_line_error, write_tiny_checkpoint, write_tiny_workspace
from refq.compare import spec_dir

import distributed                                    # setup.py's "test" extra installs it

CALIB = ("--nsamples", 4, "--seqlen", 16)
AQLM = {"nbits_per_codebook": 4, "max_iters": 3}      # small codebooks: 2x4 g8, quick


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "refq.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **(env or {})))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_workspace(tmp_path_factory.mktemp("cluster"), (("calib.txt", 400), ("a.txt", 120), ("long.txt", 4000)))


def local_client():
    """A local cluster of 2 worker processes, 1 thread each, as `local:2` makes it."""
    import logging
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.CRITICAL,
                                       env={"NUMBA_NUM_THREADS": "1"})
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


client = pytest.fixture(scope="module")(local_client)
# a cluster of its own, for a test that SIGKILLs a worker: the shared one's nanny may
# take longer than the test to bring the worker back on a loaded machine
own_client = pytest.fixture(scope="function")(local_client)


def windows_of(tiny):
    from llama_np import Tokenizer
    from refq.calibrate import calibration_windows
    ids = Tokenizer(str(tiny / "model")).encode((tiny / "calib.txt").read_text())
    return calibration_windows(ids, nsamples=4, seqlen=16, seed=0)


def quantize_to(tiny, out, method, options, cluster=None, **kw):
    """refq.quantize_model on the tiny model, saved to folder `out`; -> its files' bytes."""
    from llama_np import load_model
    from refq.pipeline import quantize_model
    model = load_model(str(tiny / "model"))
    run = quantize_model(model, method, options, windows_of(tiny), cluster=cluster, **kw)
    run.save(str(out), str(tiny / "model"))
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}


@pytest.mark.parametrize("method,options,kw", [
    ("gptq", {"bits": 3, "group_size": 16}, {}),
    ("claq", {"bits": 3}, {}),
    ("aqlm", AQLM, {}),
    ("gptq", {"bits": 3, "act_order": True}, {"true_sequential": True}),   # a group at a time
    ("squeezellm", {"bits": 3, "sensitivity": "fisher"}, {}),    # F travels with its linear
])
def test_same_bytes_as_one_process(tiny, tmp_path, client, method, options, kw):
    one = quantize_to(tiny, tmp_path / "one", method, options, **kw)
    many = quantize_to(tiny, tmp_path / "many", method, options, cluster=client, **kw)
    assert list(many) == list(one)
    for f in one:
        assert many[f] == one[f], f


class KillOnce(distributed.WorkerPlugin):
    """Kills its worker process (os._exit, no clean-up) when the worker starts a task
    whose key contains `pattern`, the first time any worker does (marker file)."""

    def __init__(self, marker, pattern):
        self.marker, self.pattern = marker, pattern

    def transition(self, key, start, finish, **kw):
        if finish != "executing" or self.pattern not in str(key):
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


def test_worker_killed_during_a_layer(tiny, tmp_path, own_client):
    options = {"bits": 3, "group_size": 16}
    one = quantize_to(tiny, tmp_path / "one", "gptq", options)
    marker = tmp_path / "killed"
    pids = set(own_client.run(os.getpid).values())
    own_client.register_plugin(KillOnce(str(marker), "layers.1.mlp.up_proj"), name="kill-once")
    try:
        many = quantize_to(tiny, tmp_path / "many", "gptq", options, cluster=own_client)
    finally:
        own_client.unregister_worker_plugin("kill-once")
    killed = int(marker.read_text())                   # a worker did start that task, and died
    assert killed in pids
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)
    assert many == one


def marked_processes(mark):
    """PIDs of the live processes whose environment holds REFQ_TEST_MARK=mark."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"REFQ_TEST_MARK={mark}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


GPTQ_CLI = ("--method", "gptq", "--bits", 3, "--group-size", 16)


@pytest.fixture(scope="module")
def gptq_one(tiny):
    """`refq quantize` of the tiny model without a cluster -> {file: bytes}."""
    out = tiny / "gptq-one"
    r = run_cli("quantize", "--model", tiny / "model", "--calib", tiny / "calib.txt", *CALIB,
                *GPTQ_CLI, "--out", out)
    assert r.returncode == 0, r.stderr
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}


def read_folder(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_cli_local_cluster_same_bytes_and_no_orphans(tiny, tmp_path, gptq_one):
    mark = uuid.uuid4().hex
    r = run_cli("quantize", "--model", tiny / "model", "--calib", tiny / "calib.txt", *CALIB,
                *GPTQ_CLI, "--out", tmp_path / "two", "--cluster", "local:2",
                env={"REFQ_TEST_MARK": mark})
    assert r.returncode == 0, r.stderr
    assert "cluster: local:2 (2 workers)" in r.stderr
    assert read_folder(tmp_path / "two") == gptq_one
    assert marked_processes(mark) == []


SLOW_AQLM = ("--nsamples", 64, "--seqlen", 32)              # with --calib long.txt
SLOW_AQLM_OPTIONS = {"nbits_per_codebook": 4, "max_iters": 50, "relative_tolerance": 0}
# a run that is still quantizing when the test stops it, however fast the machine (with
# SLOW_AQLM_OPTIONS on the 32-wide model a quiet machine finished before the SIGTERM came)
NEVER_DONE_AQLM_OPTIONS = {"nbits_per_codebook": 8, "max_iters": 10000, "relative_tolerance": 0}


def start_marked(*args, mark):
    return subprocess.Popen([sys.executable, "-m", "refq.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, REFQ_TEST_MARK=mark))


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.2)
    return condition()


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sigterm_shuts_the_local_cluster_down(tiny, tmp_path):
    mark = uuid.uuid4().hex
    wide = tmp_path / "wide"          # 128 wide, 8-bit codebooks: minutes of AQLM, not seconds
    write_tiny_checkpoint(str(wide), hidden=128, heads=4, kv_heads=2, ff=512)
    p = start_marked("quantize", "--model", wide, "--calib", tiny / "long.txt",
                     *SLOW_AQLM, "--method", "aqlm", "--options", json.dumps(NEVER_DONE_AQLM_OPTIONS),
                     "--out", tmp_path / "out", "--cluster", "local:2", mark=mark)
    for line in p.stderr:                              # the cluster is up and working
        if line.startswith("cluster: local:2"):
            break
    time.sleep(1.0)
    assert len(marked_processes(mark)) > 1             # the command and its workers
    p.send_signal(signal.SIGTERM)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 143, rest
    assert "refq quantize: terminated" in rest
    assert wait_for(lambda: marked_processes(mark) == [], 15), \
        [cmdline(pid) for pid in marked_processes(mark)]
    assert not (tmp_path / "out").exists()


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_compare_worker_killed_mid_spec(tiny, tmp_path, own_client):
    """SIGKILL the worker running a spec's `refq quantize` child: the child ends with it
    (nothing left writing the checkpoint) and the spec runs again on a live worker."""
    out = tmp_path / "cmp"
    spec = "aqlm:" + ",".join(f"{k}={v}" for k, v in SLOW_AQLM_OPTIONS.items())
    p = subprocess.Popen(
        [sys.executable, "-m", "refq.cli", "compare", "--model", str(tiny / "model"),
         "--calib", str(tiny / "long.txt"), *map(str, SLOW_AQLM), "--methods", spec,
         "--no-baseline", "--no-plot", "--ctx", "16", "--text", str(tiny / "a.txt"),
         "--out", str(out), "--json", "--cluster", own_client.scheduler.address],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = set(own_client.run(os.getpid).values())

    def children():
        return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if f"--out {out}/" in cmdline(pid) and " quantize " in cmdline(pid)]
    assert wait_for(children, 60)
    child = children()[0]
    worker = parent(child)
    assert worker in workers
    os.kill(worker, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{child}"), 10)   # ended with its worker
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    row = json.loads(stdout)["rows"][0]
    assert row["spec"] == spec and "error" not in row
    assert (out / spec_dir(spec) / "result.json").exists()


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_unreachable_cluster_is_one_line_before_any_work(tiny, tmp_path, command):
    out = tmp_path / "out"
    extra = ("--method", "gptq") if command == "quantize" else ("--methods", "gptq")
    r = run_cli(command, "--model", tiny / "model", "--calib", tiny / "calib.txt", *extra,
                "--out", out, "--cluster", "tcp://127.0.0.1:1")
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "--cluster tcp://127.0.0.1:1",
                          "cannot reach")
    assert not out.exists()


def test_compare_on_the_cluster_resumes(tiny, tmp_path, client, gptq_one):
    out = tmp_path / "cmp"
    common = ("compare", "--model", tiny / "model", "--calib", tiny / "calib.txt", *CALIB,
              "--ctx", 16, "--text", tiny / "a.txt", "--out", out, "--no-plot", "--json",
              "--no-baseline", "--cluster", client.scheduler.address)
    gptq = "gptq:bits=3,group_size=16"
    r = run_cli(*common, "--methods", gptq)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    done = out / spec_dir(gptq) / "result.json"
    before = (done.stat().st_mtime_ns, done.read_bytes())
    # the checkpoint a worker wrote is the single process's, byte for byte
    assert read_folder(out / spec_dir(gptq) / "checkpoint") == gptq_one
    # the same spec again: reused, whichever worker reads its result.json
    r = run_cli(*common, "--methods", gptq)
    assert r.returncode == 0, r.stderr
    assert f"compare: {gptq}: done before, reused" in r.stderr
    assert "running" not in r.stderr
    assert (done.stat().st_mtime_ns, done.read_bytes()) == before
    assert json.loads(r.stdout)["rows"] == [row]
