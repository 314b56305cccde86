"""Golden suite v2 (refq/golden/, GOLDEN.md) from refq's side: the shipped data/golden/
verifies against the current code in every tier (with zero difference on the machine that
wrote it); the steps' recorded states are refq's (each replay reproduces refq's full result
bit for bit); the loss tolerance follows from W_hat's; verify catches one-code / one-scale /
one-centroid mutations and names the field; bad fixtures fail per case; a version-1 suite is a
one-line error; write is byte-identical twice and across NUMBA_NUM_THREADS=1/2; the standalone
example loader works with numpy + safetensors only.  Ports: tests/test_golden_ports.py."""
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error

from refq import golden
from refq.formats.packing import pack, unpack
from refq.golden import spec, steps
from refq.golden.write import cpu_model

SHIPPED = os.path.join(REPO, "data", "golden")
FAST = ["rtn", "gptq"]                   # methods used where a test writes a suite itself


def run_cli(*args, env=None):
    e = dict(os.environ, NUMBA_NUM_THREADS=os.environ.get("NUMBA_NUM_THREADS", "1"),
             OPENBLAS_NUM_THREADS="1")
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "refq.cli", *args], cwd=REPO, env=e,
                       capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def registered():
    from refq.methods import METHODS
    return set(METHODS)


def shipped_cases(method=None):
    with open(os.path.join(SHIPPED, "manifest.json")) as f:
        m = json.load(f)
    return [c for c in m["cases"] if method is None or c["method"] == method]


def copy_suite(tmp_path, cases=None):
    """A copy of the shipped suite, restricted to `cases` (names) if given."""
    dst = str(tmp_path / "suite")
    shutil.copytree(SHIPPED, dst)
    if cases is not None:
        path = os.path.join(dst, "manifest.json")
        with open(path) as f:
            m = json.load(f)
        m["cases"] = [c for c in m["cases"] if c["name"] in cases]
        with open(path, "w") as f:
            json.dump(m, f)
    return dst


def mutate(suite, case, field, change):
    """Apply change(array) -> array to one field of a case file; fix up its sha256
    (so that verify gets to compare values, not just detect the edited file)."""
    path = os.path.join(suite, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    entry = next(c for c in m["cases"] if c["name"] == case)
    fpath = os.path.join(suite, entry["file"])
    t = golden.load_safetensors(fpath)
    t[field] = change(t[field].copy())
    blob = golden.safetensors_bytes(t)
    with open(fpath, "wb") as f:
        f.write(blob)
    entry["sha256"] = hashlib.sha256(blob).hexdigest()
    with open(path, "w") as f:
        json.dump(m, f)


def verify(suite, **kw):
    return {r["name"]: r for r in golden.verify_suite(suite, log=lambda m: None, **kw)}


# --------------------------------------------------------------------------- shipped suite
def shipped_manifest():
    with open(os.path.join(SHIPPED, "manifest.json")) as f:
        return json.load(f)


def same_machine():
    g = shipped_manifest()["generated_with"]
    import numba
    return (g.get("cpu") == cpu_model() and g.get("numpy") == np.__version__
            and g.get("numba") == numba.__version__)


def test_shipped_suite_is_small_and_complete():
    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert total < 5 * 2 ** 20
    m = shipped_manifest()
    assert m["suite_version"] == golden.SUITE_VERSION == 2
    cases = shipped_cases()
    assert {c["method"] for c in cases} == set(registered())     # every method ships cases
    for c in cases:
        assert set(c["outputs"]) == {"W_hat", "loss", "y"}, c["name"]
        for k, rule in c["fields"].items():
            assert rule["reason"]
            if rule["dtype"].startswith(("uint", "int")):
                assert rule["compare"] == "exact", (c["name"], k)
    kinds = {s["kind"] for c in cases for s in c.get("steps", {}).get("list", [])}
    assert kinds == set(steps.KINDS)                             # every step kind is exercised
    with_neutral = {c["format"]["format"] for c in cases if c["neutral"]}
    assert with_neutral == set(spec.NEUTRAL)


INT_FORMATS = ("uniform", "uniform_sparse", "spqr")      # the formats with a "cpu-int" kernel


def int8_activation_product(q, x2):
    """A wrong integer kernel: x rounded to int8 per token (127 levels) instead of int16
    per block, then multiplied exactly."""
    x64 = np.asarray(x2, np.float64)
    m = np.abs(x64).max(axis=1, keepdims=True) / 127
    xt = np.rint(x64 / np.where(m > 0, m, 1)) * m
    return (xt @ np.asarray(q.dequantize(), np.float64).T).astype(np.float32)


def test_shipped_suite_verifies_with_cpu_int(monkeypatch):
    """`refq golden verify --kernel cpu-int`: y of the integer-activation kernel within the
    exact y tolerance plus its own derived bound (spec.y_int_tolerance), on every case with
    a uniform-like format; a kernel that rounds x to int8 instead fails those cases, and the
    exact tolerance alone is too tight for the real int kernel (the bound is needed)."""
    cases = {c["name"]: c for c in shipped_manifest()["cases"]
             if c["format"]["format"] in INT_FORMATS and c["method"] in registered()}
    assert len(cases) >= 5
    res = verify(SHIPPED, cases=list(cases), kernel="cpu-int", tiers=["decode"])
    assert {n for n, r in res.items() if r["ok"]} == set(cases)
    for r in res.values():
        assert "int16-activation bound" in r["tiers"]["decode"]["checks"]["y"]["msg"]

    monkeypatch.setattr(spec, "y_int_tolerance", lambda x, W, A: 0.0)
    exact_only = verify(SHIPPED, cases=list(cases), kernel="cpu-int", tiers=["decode"])
    assert any(not r["ok"] for r in exact_only.values())
    monkeypatch.undo()

    import refq.kernels as K
    K._load_backend("cpu")
    for fmt in INT_FORMATS:
        monkeypatch.setitem(K._REGISTRY["cpu-int"], fmt, int8_activation_product)
    wrong = verify(SHIPPED, cases=list(cases), kernel="cpu-int", tiers=["decode"])
    assert all(not r["ok"] for r in wrong.values())


@pytest.mark.parametrize("method", ["rtn", "gptq", "claq", "quantease", "spqr", "squeezellm",
                                    "aqlm", "slim-quant", "slim", "wanda", "sparsegpt",
                                    "magnitude"])
def test_shipped_suite_verifies(method):
    names = [c["name"] for c in shipped_cases(method)]
    if not names:
        pytest.skip(f"no shipped cases for {method}")
    if method not in registered():
        pytest.skip(f"{method} not registered")
    res = verify(SHIPPED, methods=[method])
    assert set(res) == set(names)
    bad = {n: r["error"] for n, r in res.items() if not r["ok"]}
    assert not bad, bad
    zero = same_machine()
    for n, r in res.items():
        for tier in ("decode", "e2e"):
            assert r["tiers"][tier]["status"] == "pass", (n, tier)
        has_steps = bool(shipped_cases(method)[names.index(n)].get("steps"))
        assert r["tiers"]["steps"]["status"] == ("pass" if has_steps else "not checked")
        if zero:            # the machine that wrote the suite: every difference is exactly 0
            for tier, t in r["tiers"].items():
                for k, c in t["checks"].items():
                    if k == "loss" and tier == "e2e":
                        assert c["ratio"] == 1.0, (n, k, c)
                    else:
                        assert c.get("max_abs", 0.0) == 0.0, (n, tier, k, c)


def synthetic_runs(method, quantize=True, **override):
    """Each golden case of `method` on synthetic inputs (the real-layer ones skipped):
    (label, data, validated options with `override` applied, refq's result or None)."""
    from refq.api import quantize_weight, validate_options
    for label, inp, given in golden.CASES[method]:
        if inp == spec.R:
            continue
        d, _ = golden.make_synthetic(inp)
        opts = validate_options(method, dict(given, **override))
        yield label, d, opts, quantize_weight(d["W"], d["H"], method, **opts) if quantize else None


# --------------------------------------------------------------------------- the steps are refq's
def test_sparsegpt_and_squeezellm_steps_are_refq_state():
    """trace_sparsegpt replays refq's sweep with refq's block function: its result equals
    refq's; each squeezellm k-means, rounded to float16, is the row's stored table."""
    for method in ("sparsegpt", "squeezellm"):
        for label, d, opts, q in synthetic_runs(method):
            if method == "sparsegpt":
                st, res = steps.trace_sparsegpt(d["W"], d["H"], opts)
                assert np.array_equal(res["W_c"].astype(np.float16).astype(np.float32),
                                      q.dequantize()), label
                assert len(st) == 2
            else:
                for s in steps.trace_squeezellm(np.asarray(d["W"], np.float64), d["H"], opts):
                    r = int(s["id"].split("row")[1])
                    c = steps.KINDS["weighted_kmeans1d"].reference(s["inputs"], s["params"])
                    assert np.array_equal(np.sort(c["centroids"].astype(np.float16)), q.lut[r])


def test_quantease_sweep_step_is_refq_first_sweep():
    """The quantease_sweep reference from trace_quantease's state = refq's result after one
    sweep (iters=1; with outliers the S step that follows changes S only)."""
    from refq.methods.quantease import _init, topk_mask
    for label, d, opts, q in synthetic_runs("quantease", iters=1):
        W = np.asarray(d["W"], np.float64)
        (s,) = steps.trace_quantease(W, d["H"], opts)
        ref = steps.KINDS["quantease_sweep"].reference(s["inputs"], s["params"])["W_hat"]
        k = int(round(opts["outlier_frac"] * W.size))
        order = _init(np.where(topk_mask(W, k), 0.0, W), d["H"], opts, "")[0]
        nf = golden.neutral_fields(q)
        Wh = nf["scales"][:, nf["g_idx"]] * (nf["codes"] - nf["zeros"][:, nf["g_idx"]])
        assert np.array_equal(Wh[:, order], ref.astype(np.float32)), label


def test_spqr_group_step_is_refq_first_group():
    """spqr_group's reference on trace_spqr's state = the grid refq stored for group 0."""
    for label, d, opts, q in synthetic_runs("spqr"):
        (s,) = steps.trace_spqr(d["W"], d["H"], opts)
        ref = steps.KINDS["spqr_group"].reference(s["inputs"], s["params"])
        assert np.array_equal(ref["scale"].astype(np.float32), q.scales()[:, 0]), label
        assert np.array_equal(ref["zero"].astype(np.float32), q.zeros()[:, 0]), label
        assert ref["likely"].any(), label


def test_slim_steps_are_refq_state():
    """slim_alpha's reference = the alpha refq used (slim-quant; slim without a refit);
    slim_adapter_svd's reference, rounded to float16, = the adapters refq stored."""
    n_alpha = n_svd = 0
    for method in ("slim-quant", "slim"):
        for label, d, opts, q in synthetic_runs(method):
            t = q.tensors()
            for s in steps.trace_slim(np.asarray(d["W"], np.float64), d["H"], opts, method):
                ref = steps.KINDS[s["kind"]].reference(s["inputs"], s["params"])
                if s["kind"] == "slim_alpha" and not q.info.get("refit"):
                    assert float(ref["alpha"]) == q.info["alpha"], (method, label)
                    n_alpha += 1
                if s["kind"] == "slim_adapter_svd":
                    assert np.array_equal(ref["L"].astype(np.float16), t["lora_L"]), label
                    assert np.array_equal(ref["R"].astype(np.float16), t["lora_R"]), label
                    n_svd += 1
    assert n_alpha >= 3 and n_svd == 2


def test_aqlm_beam_step_starts_from_refq_initial_state():
    """trace_aqlm's initial codes/codebooks/scales have exactly the loss refq recorded for its
    start (info["loss_history"][0])."""
    from refq.api import quantize_weight, validate_options
    from refq.golden.steps import AqlmCodebooks
    label, inp, given = golden.CASES["aqlm"][0]
    d, _ = golden.make_synthetic(inp)
    opts = validate_options("aqlm", dict(given))
    q = quantize_weight(d["W"], d["H"], "aqlm", **opts)
    (_, beam) = steps.trace_aqlm(d["W"], d["H"], opts, q)
    inp = beam["inputs"]
    loss0 = AqlmCodebooks().objective(inp, inp["codebooks"])
    assert loss0 == pytest.approx(q.info["loss_history"][0], rel=1e-12, abs=0)


@pytest.mark.parametrize("method", ["rtn", "gptq", "claq"])
def test_step_traces_replay_refq_bit_for_bit(method):
    """Each trace_<method> replays refq's algorithm and records its state; the replay must
    reproduce refq's full result exactly, and each recorded step's reference (computed by
    refq's sub-step functions) must be what refq used at that point."""
    for label, d, opts, q in synthetic_runs(method):
        nf = golden.neutral_fields(q)
        st, res = getattr(steps, f"trace_{method}")(d["W"], d["H"], opts)
        if method == "rtn":
            assert np.array_equal(res["codes"], nf["codes"])
            continue
        perm = res["perm"]
        codes = np.empty((q.shape[0], q.shape[1]))
        if method == "gptq":
            codes[:, perm] = res["codes"]
            assert np.array_equal(res["scales"].T.astype(np.float32), nf["scales"]), label
            for s in (s for s in st if s["kind"] == "uniform_grid"):     # the grids refq fit
                gi = int(s["id"].split("-")[1])
                ref = steps.KINDS["uniform_grid"].reference(s["inputs"], s["params"])
                assert np.array_equal(ref["scale"], res["scales"][gi]), (label, s["id"])
                assert np.array_equal(ref["zero"], res["zeros"][gi]), (label, s["id"])
        else:
            codes[:, perm] = res["codes"].T
            for s in (s for s in st if s["kind"] == "kmeans1d"):         # the codebooks refq used
                j = int(s["id"].split("col")[1])
                c = steps.KINDS["kmeans1d"].reference(s["inputs"], s["params"])["centroids"]
                k = int(s["params"]["k"])
                assert np.array_equal(np.sort(c.astype(np.float16).astype(np.float64)),
                                      res["cents"][j, :k]), (label, s["id"])
        assert np.array_equal(codes, nf["codes"]), label


def test_block_update_reference_is_refq_state():
    """steps.block_update (the reference of gptq_block_update) on a recorded block's start
    state gives exactly the Err and updated weights refq's loop reached (the replay that
    recorded them reproduces refq's result bit for bit: test above)."""
    n_blocks = 0
    for label, d, opts, _ in synthetic_runs("gptq", quantize=False):
        st, res = steps.trace_gptq(d["W"], d["H"], opts)
        for s in (s for s in st if s["kind"] == "gptq_block_update"):
            b0 = int(s["id"].split("-")[1])
            Err, rest = steps.block_update(**s["inputs"])
            assert np.array_equal(Err, res["blocks"][b0][0]), (label, b0)
            assert np.array_equal(rest, res["blocks"][b0][1]), (label, b0)
            n_blocks += 1
    assert n_blocks >= 4


# --------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize("case", ["rtn-w4", "gptq-w4g32-act", "claq-ap2.5-or", "aqlm-2x6g8",
                                  "squeezellm-w3-sparse", "quantease-w3g32-outliers"])
def test_loss_tolerance_follows_from_w_hat_tolerance(case):
    """Any W_hat within its decode tolerance tau has a loss within the loss tolerance: random
    perturbations and the worst one (every entry at +-tau against the gradient)."""
    m = shipped_manifest()
    c = next(c for c in m["cases"] if c["name"] == case)
    inp = golden.load_safetensors(os.path.join(SHIPPED, m["inputs"][c["input"]]["file"]))
    ref = golden.load_safetensors(os.path.join(SHIPPED, c["file"]))
    W, H = inp["W"], inp["H"]
    neutral = {k[8:]: v for k, v in ref.items() if k.startswith("neutral.")}
    _, mag, k = golden.decode_neutral(c["format"], neutral)
    tau = spec.what_tolerance(mag, k)
    assert tau.max() > 0
    Wh = ref["W_hat"].astype(np.float64)
    L = float(ref["loss"])
    tol = spec.loss_tolerance(W, Wh, H, tau)
    E = W.astype(np.float64) - Wh
    rng = np.random.default_rng(1)
    worst = Wh - tau * np.sign(E @ H)                    # dL/dW_hat = -2 E H: move against it
    for D in [worst] + [Wh + tau * rng.uniform(-1, 1, tau.shape) for _ in range(5)]:
        Ed = W.astype(np.float64) - D
        assert abs(float(np.sum((Ed @ H) * Ed)) - L) <= tol
    # and the bound is not vacuous: tau scaled up by 1000 moves the loss past it
    Ed = W.astype(np.float64) - (Wh - 1000 * tau * np.sign(E @ H))
    assert abs(float(np.sum((Ed @ H) * Ed)) - L) > tol


def test_relative_error_only_where_reference_is_not_zero():
    from refq.golden.verify import compare_stored
    ref = np.array([0.0, 1e-300, 1.0])
    rule = {"compare": "allclose", "atol": 1e-6, "rtol": 1e-3}
    r = compare_stored("f", np.array([1e-7, 2e-300, 1.0 + 1e-4]), rule, ref)
    assert r["ok"] and abs(r["max_rel"] - 1e-4) < 1e-9         # not 1e-7 / 1e-300


# --------------------------------------------------------------------------- mutations
def _flip_one_code(a, bits, n):
    codes = unpack(a, bits, n)
    codes[1, 3] = (int(codes[1, 3]) + 1) % (1 << bits)
    return pack(codes, bits)


def test_one_code_difference_is_caught(tmp_path):
    case = "gptq-w3g24-act"
    suite = copy_suite(tmp_path, [case, "rtn-w4"])
    mutate(suite, case, "qweight", lambda a: _flip_one_code(a, 3, 64))
    res = verify(suite)
    assert res["rtn-w4"]["ok"]
    r = res[case]
    assert not r["ok"]
    assert "e2e: qweight: 1 of" in r["error"], r["error"]
    assert r["tiers"]["decode"]["checks"]["W_hat"]["n_diff"] == 1      # decoded from the stored
    assert r["tiers"]["steps"]["status"] == "pass"


def test_one_scale_and_one_codebook_entry_are_caught(tmp_path):
    suite = copy_suite(tmp_path, ["rtn-w4g32-mse", "claq-b3"])

    def bump(a):
        a[2, 1] = np.float16(float(a[2, 1]) * 1.01 + 1e-3)
        return a
    mutate(suite, "rtn-w4g32-mse", "scales", bump)
    mutate(suite, "claq-b3", "codebook_3", bump)
    res = verify(suite)
    assert not res["rtn-w4g32-mse"]["ok"] and not res["claq-b3"]["ok"]
    assert "e2e: scales: 1 of" in res["rtn-w4g32-mse"]["error"], res["rtn-w4g32-mse"]["error"]
    assert "codebook_3: 1 of" in res["claq-b3"]["error"], res["claq-b3"]["error"]


def test_mutated_step_output_is_caught(tmp_path):
    suite = copy_suite(tmp_path, ["gptq-w4"])
    path = os.path.join(suite, "manifest.json")
    m = json.load(open(path))
    entry = m["cases"][0]["steps"]
    fpath = os.path.join(suite, entry["file"])
    t = golden.load_safetensors(fpath)
    t["block-0.out.Err"] = t["block-0.out.Err"].copy()
    t["block-0.out.Err"][0, 0] *= 1.001
    blob = golden.safetensors_bytes(t)
    open(fpath, "wb").write(blob)
    entry["sha256"] = hashlib.sha256(blob).hexdigest()
    json.dump(m, open(path, "w"))
    r = verify(suite)["gptq-w4"]
    assert not r["ok"] and "steps: block-0 (gptq_block_update): Err: 1 of" in r["error"], r["error"]


def test_cli_verify_exit_codes_tiers_and_json(tmp_path):
    suite = copy_suite(tmp_path, ["rtn-w4", "rtn-w3g24-sym"])
    rc, out, err = run_cli("golden", "verify", suite, "--json")
    assert rc == 0, err
    j = json.loads(out)
    assert j["passed"] is True and j["checks"] > 0
    assert "PASS rtn-w4: decode pass" in err
    rc, out, err = run_cli("golden", "verify", suite, "--tier", "steps", "--json")
    assert rc == 0, err
    assert all(set(c["tiers"]) == {"steps"} for c in json.loads(out)["cases"])
    mutate(suite, "rtn-w4", "qweight", lambda a: _flip_one_code(a, 4, 64))
    rc, out, err = run_cli("golden", "verify", suite)
    assert rc == 1
    assert "FAIL rtn-w4: decode: W_hat: 1 of" in err and "PASS rtn-w3g24-sym" in err
    rc, out, err = run_cli("golden", "verify", suite, "--tier", "steps")   # codes not involved
    assert rc == 0, err


# --------------------------------------------------------------------------- bad fixtures
def test_bad_files_fail_per_case(tmp_path):
    names = ["rtn-w4", "rtn-w3g24-sym", "gptq-w4", "gptq-w3g24-act"]
    suite = copy_suite(tmp_path, names)
    os.remove(os.path.join(suite, "cases", "rtn-w4.safetensors"))            # missing
    p = os.path.join(suite, "cases", "rtn-w3g24-sym.safetensors")            # truncated
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[:len(data) // 2])
    p = os.path.join(suite, "cases", "gptq-w4.safetensors")                  # one byte changed
    data = bytearray(open(p, "rb").read())
    data[-1] ^= 1
    open(p, "wb").write(bytes(data))
    res = verify(suite)
    assert "missing" in res["rtn-w4"]["error"]
    assert "sha256 mismatch" in res["rtn-w3g24-sym"]["error"]
    assert "truncated" in res["rtn-w3g24-sym"]["error"]
    assert "sha256 mismatch" in res["gptq-w4"]["error"]
    assert res["gptq-w3g24-act"]["ok"]                                       # the others still run
    rc, _, err = run_cli("golden", "verify", suite)
    assert rc == 1 and err.count("FAIL") == 3 and err.count("PASS") == 1


def test_truncated_file_with_matching_sha_is_reported(tmp_path):
    suite = copy_suite(tmp_path, ["rtn-w4", "rtn-w3g24-sym"])
    mpath = os.path.join(suite, "manifest.json")
    m = json.load(open(mpath))
    e = m["cases"][0]
    p = os.path.join(suite, e["file"])
    data = open(p, "rb").read()[:100]
    open(p, "wb").write(data)
    e["sha256"] = hashlib.sha256(data).hexdigest()
    json.dump(m, open(mpath, "w"))
    res = verify(suite)
    assert "not a valid safetensors file" in res[e["name"]]["error"]
    assert res[m["cases"][1]["name"]]["ok"]


@pytest.mark.parametrize("version,needle", [(1, "version 1 predates the tiers"),
                                            (99, "version 99 is not readable")])
def test_other_suite_version_is_a_one_line_error(tmp_path, version, needle):
    suite = copy_suite(tmp_path, ["rtn-w4"])
    mpath = os.path.join(suite, "manifest.json")
    m = json.load(open(mpath))
    m["suite_version"] = version
    json.dump(m, open(mpath, "w"))
    rc, out, err = run_cli("golden", "verify", suite)
    assert_one_line_error(rc, out, err, "manifest.json", needle)


def test_missing_suite_and_bad_impl_are_one_line_errors(tmp_path):
    rc, out, err = run_cli("golden", "verify", str(tmp_path / "nope"))
    assert_one_line_error(rc, out, err, "nope", "no such folder")
    suite = copy_suite(tmp_path, ["rtn-w4"])
    rc, out, err = run_cli("golden", "verify", suite, "--impl", "no_such_module_xyz:fn")
    assert_one_line_error(rc, out, err, "--impl", "no_such_module_xyz")
    rc, out, err = run_cli("golden", "verify", suite, "--impl", "json")
    assert_one_line_error(rc, out, err, "--impl", "provides none of")


# --------------------------------------------------------------------------- --impl
IMPL = '''
import numpy as np
from refq.golden import refq_outputs, neutral_fields, decode_neutral

def quantize(method, W, H, options):
    f, q = refq_outputs(method, W, H, options, np.zeros((1, W.shape[1]), np.float32))
    return {"W_hat": f["W_hat"], "codes": neutral_fields(q)["codes"],
            "bits_per_weight": q.bits_per_weight}

def decode(fmt, fields, x):
    W_hat = decode_neutral(fmt, fields)[0]
    return {"W_hat": W_hat, "y": x @ W_hat.T}

def worse(method, W, H, options):
    f = quantize(method, W, H, options)
    f["W_hat"] = f["W_hat"] * np.float32(0.9)           # 10% shrink: a much larger loss
    return f

def wrong_bits(method, W, H, options):
    f = quantize(method, W, H, options)
    f["bits_per_weight"] += 0.25
    return f
'''


def test_impl_entry_points(tmp_path, monkeypatch):
    (tmp_path / "myimpl.py").write_text(IMPL)
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = copy_suite(tmp_path, ["rtn-w4", "gptq-w4", "claq-b3"])
    res = verify(suite, impl="myimpl")
    for n, r in res.items():
        assert r["ok"], (n, r["error"])
        assert r["tiers"]["steps"]["status"] == "not checked"
        assert r["tiers"]["decode"]["status"] == r["tiers"]["e2e"]["status"] == "pass"
        assert r["tiers"]["e2e"]["checks"]["codes"]["frac_diff"] == 0.0
    res = verify(suite, impl="myimpl:worse")               # MODULE:FUNCTION = quantize
    assert all("e2e: loss" in r["error"] and "band <= 1.02x" in r["error"]
               for r in res.values()), res
    res = verify(suite, impl="myimpl:wrong_bits")
    assert all(r["error"].startswith("e2e: bits/weight") for r in res.values()), res


# --------------------------------------------------------------------------- determinism
def test_write_twice_is_byte_identical(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    golden.write_suite(a, methods=FAST, real=False, log=lambda m: None)
    golden.write_suite(b, methods=FAST, real=False, log=lambda m: None)
    assert_same_tree(a, b)
    res = verify(a)
    assert res and all(r["ok"] for r in res.values())
    # (byte equality with the shipped files is only promised on the machine that
    # wrote them; elsewhere test_shipped_suite_verifies applies the tolerances)


def assert_same_tree(a, b):
    files = lambda d: sorted(os.path.relpath(os.path.join(r, f), d)          # noqa: E731
                             for r, _, fs in os.walk(d) for f in fs)
    assert files(a) == files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files(a), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_write_refuses_existing_dir_and_reports_unknown_method(tmp_path):
    d = str(tmp_path / "s")
    os.makedirs(d)
    rc, out, err = run_cli("golden", "write", d, "--methods", "rtn", "--no-real")
    assert_one_line_error(rc, out, err, d, "--force")
    rc, out, err = run_cli("golden", "write", d, "--methods", "rtn", "nosuchmethod",
                           "--no-real", "--force")
    assert rc == 0, err
    assert "method nosuchmethod left out: not registered" in err
    assert json.load(open(os.path.join(d, "manifest.json")))["cases"]


def test_bit_identical_across_numba_threads(tmp_path):
    a, b = str(tmp_path / "t1"), str(tmp_path / "t2")
    methods = sorted(registered())      # every method: each one's numba code must be thread-invariant
    for d, n in ((a, "1"), (b, "2")):
        rc, _, err = run_cli("golden", "write", d, "--no-real", "--methods", *methods,
                             env={"NUMBA_NUM_THREADS": n})
        assert rc == 0, err
    assert_same_tree(a, b)


# --------------------------------------------------------------------------- example loader
def test_example_loader_standalone():
    script = os.path.join(REPO, "examples", "load_golden_case.py")
    for case in ("gptq-w3g24-act", "claq-ap2.5-or", "rtn-w3g24-sym"):
        r = subprocess.run([sys.executable, script, SHIPPED, case], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=""), cwd="/")
        assert r.returncode == 0, r.stderr + r.stdout
        assert "OK" in r.stdout
    r = subprocess.run([sys.executable, script, SHIPPED, "no-such-case"], capture_output=True,
                       text=True, cwd="/")
    assert r.returncode != 0
