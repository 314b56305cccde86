"""`refq golden verify`: check refq, or another implementation (--impl), tier by tier.

Tiers (GOLDEN.md): decode (the stored quantization -> W_hat, y, loss), steps
(teacher-forced sub-steps), e2e (the whole quantization: bits per weight,
layer loss within a band of refq's, fraction of differing codes reported).
Each check is "pass", "fail" or "not checked" (the implementation does not
provide it); a case fails when any of its checks fails; a run fails when any
case fails or when no check ran at all.
"""
import importlib
import inspect
import os
import sys

import numpy as np

from refq.errors import RefqError
from refq.golden import io, spec
from refq.golden import steps as steps_mod
from refq.golden.write import log_stderr, refq_outputs

PRIVATE_PARAMS = {"cond"}       # step parameters used by the judge only, not passed to a port


# ============================================================================ implementations
class Impl:
    """What an --impl provides: decode(fmt, fields, x), quantize(method, W, H, options[, x]),
    step_<kind>(**inputs, **params).  Missing entries are 'not checked'."""

    def __init__(self, label, obj):
        self.label = label
        self.obj = obj

    def get(self, name):
        if callable(self.obj) and not inspect.ismodule(self.obj) and not inspect.isclass(self.obj):
            return self.obj if name == "quantize" else None      # MODULE:FUNCTION = quantize
        fn = getattr(self.obj, name, None)
        return fn if callable(fn) else None

    def call(self, name, *args, **kw):
        """Call an entry; any exception or exit of the implementation becomes ImplFailure."""
        fn = self.get(name)
        try:
            return fn(*args, **kw)
        except KeyboardInterrupt:
            raise
        except NotImplementedError:
            raise NotPorted(name) from None
        except SystemExit as e:
            raise ImplFailure(f"--impl {name} exited (SystemExit({e.code!r})): an "
                              "implementation must return, not exit") from None
        except BaseException as e:
            text = str(e).splitlines()[0] if str(e) else ""
            raise ImplFailure(f"--impl {name} raised {type(e).__name__}: {text}") from None


class ImplFailure(Exception):
    pass


class NotPorted(Exception):
    """The implementation raised NotImplementedError: this method / format / step is not
    ported (reported as not checked, not as a failure)."""


def load_impl(spec_str):
    """'MODULE' or 'MODULE:NAME' -> Impl (RefqError, one line, if it cannot be loaded)."""
    if not spec_str or spec_str.startswith(":") or spec_str.endswith(":"):
        raise RefqError(f"--impl {spec_str!r}: expected MODULE or MODULE:NAME")
    mod_name, _, attr = spec_str.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except KeyboardInterrupt:
        raise
    except SystemExit as e:
        raise RefqError(f"--impl {spec_str}: importing {mod_name} exited "
                        f"(SystemExit({e.code!r}))") from None
    except BaseException as e:
        raise RefqError(f"--impl {spec_str}: cannot import {mod_name} "
                        f"({type(e).__name__}: {e})") from None
    obj = mod
    if attr:
        obj = getattr(mod, attr, None)
        if obj is None:
            raise RefqError(f"--impl {spec_str}: {mod_name} has no {attr!r}")
    impl = Impl(spec_str, obj)
    entries = ["decode", "quantize"] + [f"step_{k}" for k in steps_mod.KINDS]
    if not any(impl.get(e) for e in entries):
        raise RefqError(f"--impl {spec_str}: provides none of decode, quantize, step_<kind> "
                        "(GOLDEN.md, 'Writing a port')")
    return impl


def _accepts(fn, name):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


# ============================================================================ comparisons
def _within(name, got, ref, tol, what="tolerance"):
    """Elementwise |got - ref| <= tol (tol array or scalar) -> check dict."""
    got = np.asarray(got)
    if got.shape != ref.shape:
        return {"ok": False, "msg": f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"}
    if got.dtype.kind not in "fiub":
        return {"ok": False, "msg": f"{name}: dtype {got.dtype}, expected numbers"}
    g64, r64 = got.astype(np.float64), ref.astype(np.float64)
    err = np.abs(g64 - r64)
    err = np.where(np.isnan(g64) & np.isnan(r64), 0.0, err)
    err = np.where(np.isnan(err), np.inf, err)
    bad = err > tol
    n = int(np.count_nonzero(bad))
    r = {"ok": n == 0, "max_abs": float(err.max()) if err.size else 0.0, "n_diff": n,
         "n": int(ref.size)}
    if n:
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        t = float(np.broadcast_to(tol, err.shape)[i])
        r["msg"] = (f"{name}: {n} of {ref.size} values outside the {what} (first at "
                    f"{list(i)}: {g64[i]:.8g}, expected {r64[i]:.8g}, |diff| {err[i]:.3g} > "
                    f"{t:.3g})")
    else:
        r["msg"] = f"{name}: max |diff| {r['max_abs']:.3g}, within the {what}"
    return r


def compare_stored(name, got, rule, ref, fmt=None):
    """refq's own stored fields: exact for integers, allclose (rule) for floats."""
    got = np.asarray(got)
    if got.shape != ref.shape:
        return {"ok": False, "msg": f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"}
    if rule["compare"] == "exact":
        if got.dtype.kind not in "biu":
            return {"ok": False, "msg": f"{name}: dtype {got.dtype}, expected integers"}
        n = int(np.count_nonzero(got.astype(np.int64) != ref.astype(np.int64)))
        return {"ok": n == 0, "n_diff": n, "n": int(ref.size),
                "max_abs": float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0,
                "msg": f"{name}: {n} of {ref.size} elements differ" if n else f"{name}: equal"}
    r64 = np.abs(ref.astype(np.float64))
    r = _within(name, got, ref, rule["atol"] + rule["rtol"] * r64)
    # relative error only where the reference is not ~0 (above the absolute tolerance)
    big = r64 > max(rule["atol"], 1e-300)
    if big.any():
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        r["max_rel"] = float(np.max(err[big] / r64[big]))
    return r


def _summ(checks):
    if not checks:
        return "not checked"
    return "fail" if any(not c["ok"] for c in checks.values()) else "pass"


# ============================================================================ tiers
def tier_decode(case, ref, x, impl, kernel):
    """-> checks dict (empty: not checked)."""
    fmt = case.get("format", {})
    checks = {}
    neutral = {k[len("neutral."):]: v for k, v in ref.items() if k.startswith("neutral.")}
    ref_W = ref["W_hat"]
    dec = spec.decode_neutral(fmt, neutral) if neutral else None
    if dec is not None:
        _, mag, k = dec
        tau = spec.what_tolerance(mag, k)
    else:
        tau = np.zeros(ref_W.shape)              # refq decodes its own format exactly
    q = None
    if impl is None:
        got_W, got_y, q = _refq_decode(case, ref, x, kernel)
        if dec is not None:
            checks["neutral"] = _within("neutral W_hat", dec[0], ref_W, tau,
                                        "float32 rounding bound of the neutral formula")
    else:
        if impl.get("decode") is None or dec is None:
            return checks
        fields = {k: v.copy() for k, v in neutral.items()}
        out = impl.call("decode", dict(fmt), fields, x.copy())
        if not isinstance(out, dict):
            raise ImplFailure(f"--impl decode returned {type(out).__name__}, expected a dict "
                              "with W_hat (and y)")
        if "W_hat" not in out and "y" not in out:
            raise ImplFailure("--impl decode returned neither W_hat nor y")
        got_W, got_y = out.get("W_hat"), out.get("y")
    if got_W is not None:
        checks["W_hat"] = _within("W_hat", got_W, ref_W, tau,
                                  f"float32 rounding bound of the {fmt.get('format')} formula")
        if checks["W_hat"]["ok"]:
            loss = _loss(case["_W"], got_W, case["_H"])
            ltol = spec.loss_tolerance(case["_W"], ref_W, case["_H"], tau)
            checks["loss"] = _within("loss", np.array(loss), ref["loss"], ltol,
                                     "loss tolerance derived from W_hat's")
    if got_y is not None:
        ytol = spec.y_tolerance(x, ref_W, tau)
        what = "dot-product bound 2 gamma_n sum |x||W_hat|"
        A = spec.int_magnitude(q) if kernel == "cpu-int" and q is not None else None
        if A is not None:
            ytol = ytol + spec.y_int_tolerance(x, ref_W, A)
            what += " + the int16-activation bound of kernel cpu-int"
        checks["y"] = _within("y", got_y, ref["y"], ytol, what)
    return checks


def _refq_decode(case, ref, x, kernel):
    from refq.formats.base import load_quantized
    tensors = {k: ref[k] for k in case["fields"]}
    q = load_quantized(tensors, dict(case["format"], method=case["method"], options={}, info={}))
    return (np.asarray(q.dequantize(), np.float32), np.asarray(q.matmul(x, kernel=kernel), np.float32),
            q)


def _loss(W, W_hat, H):
    E = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    return float(np.sum((E @ H) * E))


def tier_steps(case, steps_data, impl, case_input):
    checks = {}
    for s in case.get("steps", {}).get("list", []):
        kind = steps_mod.KINDS.get(s["kind"])
        key = f"{s['id']} ({s['kind']})"
        if kind is None:
            checks[key] = {"ok": False, "msg": f"{key}: unknown step kind (a newer suite?)"}
            continue
        inputs = {k: (np.asarray(case_input[e["from_input"]], np.float64) if "from_input" in e
                      else steps_data[f"{s['id']}.in.{k}"]) for k, e in s["inputs"].items()}
        refout = {k: steps_data[f"{s['id']}.out.{k}"] for k in s["outputs"]}
        params = io.from_json(s["params"])
        if impl is None:
            got = kind.reference(inputs, params)
        else:
            fn_name = f"step_{s['kind']}"
            if impl.get(fn_name) is None:
                continue
            port_params = {k: v for k, v in params.items() if k not in PRIVATE_PARAMS}
            try:
                got = impl.call(fn_name, **{k: v.copy() for k, v in inputs.items()},
                                **port_params)
            except NotPorted:
                continue
            except ImplFailure as e:
                checks[key] = {"ok": False, "msg": f"{key}: {e}"}
                continue
            if not isinstance(got, dict):
                checks[key] = {"ok": False, "msg": f"{key}: returned {type(got).__name__}, "
                                                   "expected a dict of outputs"}
                continue
        try:
            r = kind.judge(inputs, params, refout, got)
        except steps_mod.StepMismatch as e:
            r = {"ok": False, "msg": str(e)}
        except Exception as e:
            r = {"ok": False, "msg": f"cannot judge ({type(e).__name__}: {e})"}
        try:                                     # report the largest difference of any output
            r["max_abs"] = max((float(np.max(np.abs(np.asarray(got[k], np.float64) - refout[k])))
                                if refout[k].size else 0.0) for k in refout)
        except Exception:
            pass
        r["msg"] = f"{key}: {r['msg']}"
        checks[key] = r
    return checks


def tier_e2e(case, ref, W, H, x, impl, kernel):
    checks = {}
    options = io.from_json(case["options"])
    method = case["method"]
    neutral_ref = {k[len("neutral."):]: v for k, v in ref.items() if k.startswith("neutral.")}
    if impl is None:
        got, q = refq_outputs(method, W, H, options, x, kernel=kernel)
        got["bits_per_weight"] = q.bits_per_weight
        for k in sorted(case["fields"]):
            if k not in got:
                checks[k] = {"ok": False, "msg": f"{k}: not produced by refq"}
            else:
                checks[k] = compare_stored(k, got[k], case["fields"][k], ref[k])
        extra = sorted(set(got) - set(case["fields"]) - set(spec.RESERVED) - {"bits_per_weight"})
        if extra:
            checks["format"] = {"ok": False, "msg": f"unexpected field(s) {', '.join(extra)} "
                                                    "(the stored format changed)"}
        got["codes"] = spec.neutral_fields(q).get("codes")
    else:
        if impl.get("quantize") is None:
            return checks
        fn = impl.get("quantize")
        kw = {"x": x.copy()} if _accepts(fn, "x") else {}
        got = impl.call("quantize", method, W.copy(), H.copy(), dict(options), **kw)
        if not isinstance(got, dict):
            raise ImplFailure(f"--impl quantize returned {type(got).__name__}, expected a dict "
                              "with W_hat (GOLDEN.md)")
        if "W_hat" not in got:
            raise ImplFailure("--impl quantize returned no W_hat")
    Wh = np.asarray(got["W_hat"])
    if Wh.shape != ref["W_hat"].shape:
        checks["W_hat"] = {"ok": False, "msg": f"W_hat: shape {tuple(Wh.shape)}, expected "
                                               f"{tuple(ref['W_hat'].shape)}"}
        return checks
    if not np.all(np.isfinite(Wh)):
        checks["W_hat"] = {"ok": False, "msg": "W_hat: not finite"}
        return checks
    loss = _loss(W, Wh, H)
    rl = float(ref["loss"])
    band = case.get("e2e", {}).get("loss_band", spec.e2e_band(method))
    bound = band * rl + spec.loss_rounding(W, ref["W_hat"], H) + spec.loss_rounding(W, Wh, H)
    ratio = loss / rl if rl > 0 else (1.0 if loss == 0 else float("inf"))
    checks["loss"] = {"ok": loss <= bound, "ratio": ratio,
                      "msg": f"loss {loss:.6g} = {ratio:.4f} x refq's {rl:.6g} (band <= {band}x)"}
    if "bits_per_weight" in got and got["bits_per_weight"] is not None:
        b = float(got["bits_per_weight"])
        rb = float(case["bits_per_weight"])
        checks["bits_per_weight"] = {"ok": abs(b - rb) <= 1e-9 * max(1.0, rb),
                                     "msg": f"bits/weight {b:.6g}, refq {rb:.6g}"}
    if got.get("codes") is not None and "codes" in neutral_ref:
        c = np.asarray(got["codes"])
        rc = neutral_ref["codes"]
        if c.shape != rc.shape:
            checks["codes"] = {"ok": False, "msg": f"codes: shape {tuple(c.shape)}, expected "
                                                   f"{tuple(rc.shape)} (neutral form)"}
        else:
            frac = float(np.mean(c.astype(np.int64) != rc.astype(np.int64)))
            checks["codes"] = {"ok": True, "info": True, "frac_diff": frac,
                               "msg": f"codes: {100 * frac:.2f}% differ from refq's (reported, "
                                      "not required)"}
    return checks


# ============================================================================ the run
def verify_suite(root, impl=None, kernel="cpu", methods=None, cases=None, tiers=None,
                 log=log_stderr):
    """Verify every case -> list of per-case result dicts:
    {name, method, ok, checked, error, skipped?, tiers: {tier: {status, checks}}}.
    A manifest of another suite version is a one-line RefqError."""
    m = io.read_manifest(root)
    version = m.get("suite_version")
    if m.get("suite") != spec.SUITE or version not in spec.KNOWN_SUITE_VERSIONS:
        hint = (" (suite version 1 predates the tiers; rewrite it with `refq golden write DIR "
                "--force`, or verify it with the refq that wrote it)" if version == 1 else "")
        raise RefqError(f"{os.path.join(root, 'manifest.json')}: suite {m.get('suite')!r} "
                        f"version {version!r} is not readable by this refq (it reads "
                        f"{spec.SUITE} version {spec.SUITE_VERSION}){hint}")
    if isinstance(impl, str):
        impl = load_impl(impl)
    tiers = list(tiers or spec.TIERS)
    input_cache, results = {}, []
    for case in m["cases"]:
        name = case.get("name", "?") if isinstance(case, dict) else "?"
        method = case.get("method") if isinstance(case, dict) else None
        if methods and method not in methods:
            continue
        if cases and name not in cases:
            continue
        res = {"name": name, "method": method, "ok": False, "checked": 0, "error": None,
               "tiers": {}}
        results.append(res)
        try:
            if impl is None:
                from refq.methods import METHODS
                if method not in METHODS:
                    res["skipped"] = True
                    res["error"] = f"method {method!r} is not registered in this refq"
                    continue
            inp = case["input"]
            if inp not in input_cache:
                try:
                    input_cache[inp] = io.read_checked(root, m["inputs"][inp], f"input {inp}")
                except KeyError:
                    input_cache[inp] = RefqError(f"input {inp!r} is not in the manifest")
                except RefqError as e:
                    input_cache[inp] = e
            d = input_cache[inp]
            if isinstance(d, Exception):
                raise d
            ref = io.read_checked(root, case, f"case {name}")
            for k in list(case.get("fields", {})) + list(spec.RESERVED):
                if k not in ref:
                    raise RefqError(f"case {name}: field {k} missing from {case['file']}")
            W, H, x = d["W"], d["H"], d["x"]
            case["_W"], case["_H"] = W, H
            problems = []
            for tier in tiers:
                try:
                    if tier == "decode":
                        checks = tier_decode(case, ref, x, impl, kernel)
                    elif tier == "steps":
                        if "steps" in case:
                            sd = io.read_checked(root, case["steps"], f"case {name} steps")
                            checks = tier_steps(case, sd, impl, d)
                        else:
                            checks = {}
                    else:
                        checks = tier_e2e(case, ref, W, H, x, impl, kernel)
                except ImplFailure as e:
                    checks = {"impl": {"ok": False, "msg": str(e)}}
                except NotPorted:
                    checks = {}
                status = _summ(checks)
                res["tiers"][tier] = {"status": status, "checks": checks}
                res["checked"] += sum(1 for c in checks.values() if not c.get("info"))
                if status == "fail":
                    bad = [c["msg"] for c in checks.values() if not c["ok"]]
                    problems.append(f"{tier}: " + "; ".join(bad))
            res["ok"] = not problems and res["checked"] > 0
            if problems:
                res["error"] = " | ".join(problems)
            elif not res["checked"]:
                res["error"] = "nothing checked (the implementation provides none of these tiers)"
        except RefqError as e:
            res["error"] = str(e)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            if isinstance(case, dict):
                case.pop("_W", None)
                case.pop("_H", None)
    return results


def status_of(r):
    if r.get("skipped"):
        return "SKIP"
    if r["ok"]:
        return "PASS"
    if not r["checked"] and (r["error"] or "").startswith("nothing checked"):
        return "NOT CHECKED"
    return "FAIL"


def summary_line(r):
    st = status_of(r)
    if st in ("SKIP", "NOT CHECKED"):
        return f"{st} {r['name']}: {r['error']}"
    parts = []
    for tier, t in r["tiers"].items():
        cs = t["checks"]
        if t["status"] == "not checked":
            parts.append(f"{tier} not checked")
            continue
        n_ok = sum(1 for c in cs.values() if c["ok"] and not c.get("info"))
        n = sum(1 for c in cs.values() if not c.get("info"))
        extra = ""
        if tier == "e2e":
            if "loss" in cs and "ratio" in cs["loss"]:
                extra += f", loss {cs['loss']['ratio']:.4f}x refq"
            if "codes" in cs and "frac_diff" in cs["codes"]:
                extra += f", {100 * cs['codes']['frac_diff']:.2f}% codes differ"
        mabs = max((c.get("max_abs", 0.0) or 0.0 for c in cs.values()), default=0.0)
        if tier != "e2e" or "loss" not in cs:
            extra += f", max |diff| {mabs:.3g}"
        parts.append(f"{tier} {t['status']} {n_ok}/{n}{extra}")
    line = "; ".join(parts)
    if st == "PASS":
        return f"PASS {r['name']}: {line}"
    return f"FAIL {r['name']}: {r['error']}" + (f" [{line}]" if parts else "")
