"""`refq compare` end to end on a tiny random model.

Independent truths: the perplexities are recomputed in-process with llama_np
from each saved checkpoint; bits per weight are recomputed from the stored
bytes by `refq info`'s summary; packed sizes by walking the folder; the Pareto
front is checked against a front worked out by hand.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error, write_tiny_checkpoint, write_tiny_workspace
from refq.compare import BASELINE, options_arg, pareto, parse_spec, spec_dir
from refq.errors import RefqError

SPECS = ["rtn:bits=3,group_size=16", "gptq:bits=3,group_size=16,act_order=true"]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "refq.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_workspace(tmp_path_factory.mktemp("compare"), (("calib.txt", 300), ("a.txt", 120), ("b.txt", 90)))


def common(tiny, out):
    return ["compare", "--model", tiny / "model", "--calib", tiny / "calib.txt",
            "--nsamples", 4, "--seqlen", 16, "--ctx", 16, "--out", out]


@pytest.fixture(scope="module")
def done(tiny):
    """One compare run with two specs and one text -> (out dir, report, stderr)."""
    out = tiny / "out"
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", "--methods", *SPECS, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout), r.stderr


def test_table_numbers_match_the_checkpoints(tiny, done):
    from llama_np import Tokenizer, perplexity
    from refq.loading import load_for_inference
    from refq.quantize_cli import summarize
    out, report, _ = done
    rows = {r["spec"]: r for r in report["rows"]}
    assert list(rows) == [BASELINE] + SPECS
    ids = Tokenizer(str(tiny / "model")).encode((tiny / "a.txt").read_text())
    for spec in SPECS:
        r = rows[spec]
        ckpt = out / spec_dir(spec) / "checkpoint"
        model, _, _ = load_for_inference(str(ckpt), kernel="dequant")
        ppl, _, _ = perplexity(model, ids, 16)
        assert r["ppl"]["a.txt"] == pytest.approx(ppl, rel=1e-6)
        assert r["bits_per_weight"] == pytest.approx(summarize(str(ckpt))["bits_per_weight"],
                                                     abs=1e-9)
        assert r["packed_bytes"] == sum(os.path.getsize(ckpt / f) for f in os.listdir(ckpt))
        assert 20 < r["peak_rss_mib"] < 4096      # the child's own peak, in MiB
        assert r["quantize_seconds"] > 0
    assert rows["gptq:bits=3,group_size=16,act_order=true"]["options"]["act_order"] is True
    base = rows[BASELINE]
    model, _, _ = load_for_inference(str(tiny / "model"), kernel="dequant")
    assert base["ppl"]["a.txt"] == pytest.approx(perplexity(model, ids, 16)[0], rel=1e-6)
    md = (out / "compare.md").read_text()
    assert sum(line.startswith("|") for line in md.splitlines()) == 2 + 3   # header, rule, 3 rows
    assert json.loads((out / "compare.json").read_text()) == report


def test_resume_reuses_and_evaluates_only_new_texts(tiny, done):
    out, report, _ = done
    res = out / spec_dir(SPECS[0]) / "result.json"
    before = res.read_text()
    ckpt_mtime = os.path.getmtime(out / spec_dir(SPECS[0]) / "checkpoint" / "model.safetensors")
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", tiny / "b.txt",
                "--methods", *SPECS, "--json")
    assert r.returncode == 0, r.stderr
    assert "done before" not in r.stderr and r.stderr.count("evaluating on b.txt") == 3
    assert "refq quantize" not in r.stderr and "bits per weight over" not in r.stderr
    assert os.path.getmtime(out / spec_dir(SPECS[0]) / "checkpoint" / "model.safetensors") \
        == ckpt_mtime
    again = json.loads(r.stdout)
    for old, new in zip(report["rows"], again["rows"]):
        assert new["ppl"]["a.txt"] == old["ppl"]["a.txt"]        # not recomputed
        assert "b.txt" in new["ppl"]
    assert res.read_text() != before
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", tiny / "b.txt",
                "--methods", *SPECS)
    assert r.returncode == 0 and r.stderr.count("done before, reused") == 3


def test_other_settings_in_the_same_dir_are_refused(tiny, done):
    out, _, _ = done
    args = common(tiny, out)
    args[args.index("--nsamples") + 1] = 8
    r = run_cli(*args, "--text", tiny / "a.txt", "--methods", SPECS[0])
    assert_one_line_error(r.returncode, r.stdout, r.stderr, str(out), "nsamples")


def test_a_failing_spec_is_reported_and_the_others_run(tiny, tmp_path):
    out = tmp_path / "out"
    # 2^12 codes of g=8 is more codes than the 32x32 layer's 128 groups: refused per layer
    bad = "aqlm:num_codebooks=1,nbits_per_codebook=12,in_group_size=8"
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", "--no-baseline",
                "--methods", bad, SPECS[0], "--json")
    assert r.returncode == 1
    rows = {x["spec"]: x for x in json.loads(r.stdout)["rows"]}
    assert rows[bad]["error"].startswith("refq quantize exited with 2")
    assert not (out / spec_dir(bad) / "result.json").exists()
    assert "a.txt" in rows[SPECS[0]]["ppl"] and "error" not in rows[SPECS[0]]
    assert "failed: refq quantize exited" in (out / "compare.md").read_text()


def test_plot_is_a_png(tiny, done):
    pytest.importorskip("matplotlib")
    out, _, err = done
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compare: plot" in err


@pytest.mark.parametrize("spec,names", [
    ("nosuch", ["nosuch", "unknown method"]),
    ("rtn:bits", ["rtn:bits", "OPTION=VALUE"]),
    ("rtn:bits=9", ["--bits", "9"]),
    ("rtn:blocksize=16", ["--blocksize", "not an option of method rtn"]),
    ("aqlm:seed=3", ["seed", "--seed"]),
    ("claq:column_bits=3", ["column_bits", "API only"]),
    ("rtn:bits=3,bits=4", ["bits", "twice"]),
])
def test_bad_specs_are_one_line_errors_before_any_work(tiny, tmp_path, spec, names):
    out = tmp_path / "out"
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", "--methods", "rtn", spec)
    assert_one_line_error(r.returncode, r.stdout, r.stderr, *names)
    assert not out.exists()


def test_bad_texts_and_numbers(tiny, tmp_path):
    out = tmp_path / "out"
    r = run_cli(*common(tiny, out), "--text", tmp_path / "missing.txt", "--methods", "rtn")
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "--text", "missing.txt")
    (tmp_path / "one.txt").write_text("w5\n")                 # a single token
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", tmp_path / "one.txt", "--methods", "rtn")
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "--text", "one.txt", "1 token")
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", "--nsamples", 0, "--methods", "rtn")
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "--nsamples 0")
    assert not out.exists()


def test_spec_parsing_and_flags():
    m, o = parse_spec("claq:bits=2.2,outlier-reservation=true,or_fit=before")
    assert m == "claq" and o == {"bits": 2.2, "outlier_reservation": True, "or_fit": "before"}
    # the child gets the values themselves, as JSON (not flags to be parsed again)
    assert options_arg(o) == ["--options", '{"bits": 2.2, "outlier_reservation": true, '
                                           '"or_fit": "before"}']
    m, o = parse_spec("gptq:group_size=none,act_order=false")
    assert o == {"group_size": None, "act_order": False}
    assert options_arg(o) == ["--options", '{"group_size": null, "act_order": false}']
    assert options_arg({}) == []
    assert spec_dir("gptq:bits=3,group_size=128") == "gptq_bits=3_group_size=128"
    with pytest.raises(RefqError):
        parse_spec("gptq:bits=x")


def test_pareto_front_by_hand():
    def row(spec, b, p):
        return {"spec": spec, "method": "rtn", "bits_per_weight": b, "ppl": {"t": p}}
    rows = [row("a", 2.0, 100.0), row("b", 3.0, 50.0), row("c", 3.0, 60.0),   # c: b dominates
            row("d", 4.0, 50.0),                                              # d: b dominates
            row("e", 4.5, 40.0), row("f", 2.5, 200.0),                        # f: a dominates
            {"spec": BASELINE, "method": BASELINE, "bits_per_weight": 32.0, "ppl": {"t": 1.0}},
            dict(row("g", 1.0, 1.0), error="failed")]
    assert pareto(rows, "t") == {"a", "b", "e"}


# --------------------------------------------------------------------------- ckpt:PATH rows
@pytest.fixture(scope="module")
def wide(tiny):
    """A model whose widths are multiples of 32 (so refq exports it as GPTQ), with
    an RTN w4 g32 checkpoint of refq's and its GPTQ (Hugging Face layout) export:
    a checkpoint as another tool writes it."""
    d = tiny / "wide"
    write_tiny_checkpoint(str(d / "model"), hidden=64, heads=4, kv_heads=2, ff=64, seed=1)
    r = run_cli("quantize", "--model", d / "model", "--method", "rtn", "--bits", 4,
                "--group-size", 32, "--sym", "--calib", tiny / "calib.txt", "--nsamples", 4,
                "--seqlen", 16, "--out", d / "refq")
    assert r.returncode == 0, r.stderr
    r = run_cli("export", d / "refq", "--to", "gptq", "--out", d / "gptq")
    assert r.returncode == 0, r.stderr
    return d


def test_ckpt_rows_are_evaluated_not_quantized(tiny, wide):
    from safetensors.numpy import load_file

    from llama_np import Tokenizer, perplexity
    from refq.loading import load_for_inference
    out = wide / "out"
    specs = [f"ckpt:{wide / 'gptq'}", f"ckpt:{wide / 'refq'}", "rtn:bits=4,group_size=32,sym=true"]
    args = ["compare", "--model", wide / "model", "--calib", tiny / "calib.txt", "--nsamples", 4,
            "--seqlen", 16, "--ctx", 16, "--out", out, "--text", tiny / "a.txt"]
    r = run_cli(*args, "--methods", *specs, "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["spec"]: x for x in json.loads(r.stdout)["rows"]}
    ids = Tokenizer(str(wide / "model")).encode((tiny / "a.txt").read_text())
    for spec in specs[:2]:
        row, folder = rows[spec], spec[len("ckpt:"):]
        model, _, _ = load_for_inference(folder, kernel="dequant")
        assert row["ppl"]["a.txt"] == pytest.approx(perplexity(model, ids, 16)[0], rel=1e-6)
        assert row["quantize_seconds"] is None and row["peak_rss_mib"] is None
        assert row["packed_bytes"] == sum(os.path.getsize(os.path.join(folder, f))
                                          for f in os.listdir(folder))
        assert row["checkpoint"] == folder
    # bits per weight of the GPTQ row: every stored byte of its 14 quantized linears
    t = load_file(str(wide / "gptq" / "model.safetensors"))
    qbytes = sum(a.nbytes for k, a in t.items() if k.rsplit(".", 1)[1] in
                 ("qweight", "qzeros", "scales", "g_idx"))
    n = 2 * (5 * 64 * 64 + 2 * 32 * 64)                  # q, o, gate, up, down; k, v
    assert rows[specs[0]]["bits_per_weight"] == pytest.approx(8 * qbytes / n, rel=1e-12)
    assert rows[specs[0]]["checkpoint_method"].startswith("gptq")
    # the export is exact and rtn is deterministic: the three rows score the same
    assert rows[specs[0]]["ppl"] == rows[specs[1]]["ppl"] == rows[specs[2]]["ppl"]
    assert not os.path.exists(out / spec_dir(specs[0]) / "checkpoint")    # not copied
    md = (out / "compare.md").read_text()
    assert "checkpoint: gptq" in md and " | - | - | " in md
    # resumed: reused; a checkpoint that changed since is evaluated again
    r = run_cli(*args, "--methods", *specs)
    assert r.returncode == 0 and r.stderr.count("done before, reused") == 4, r.stderr
    os.utime(wide / "gptq" / "config.json", ns=(1, 1))
    r = run_cli(*args, "--methods", *specs)
    assert r.returncode == 0 and r.stderr.count("done before, reused") == 3, r.stderr
    assert r.stderr.count("changed since") == 1


def test_bad_ckpt_specs_are_one_line_errors_before_any_work(tiny, wide, tmp_path):
    out = tmp_path / "out"
    common_wide = ["compare", "--model", wide / "model", "--calib", tiny / "calib.txt",
                   "--text", tiny / "a.txt", "--out", out, "--methods"]
    for spec, names in [("ckpt:", ["ckpt:", "PATH"]),
                        (f"ckpt:{tmp_path / 'none'}", ["none", "no such folder"]),
                        (f"ckpt:{wide / 'model'}", ["model", "not a quantized checkpoint"])]:
        r = run_cli(*common_wide, spec)
        assert_one_line_error(r.returncode, r.stdout, r.stderr, *names)
    r = run_cli(*common(tiny, out), "--text", tiny / "a.txt", "--methods", f"ckpt:{wide / 'gptq'}")
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "hidden_size 64", "another model")
    assert not out.exists()
