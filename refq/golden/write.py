"""`refq golden write`: compute every case with refq and write the suite (GOLDEN.md).

Deterministic: no timestamps, sorted JSON keys, safetensors written by
refq.golden.io.safetensors_bytes, fixed seeds; two writes on the same machine
give byte-identical folders (tests/test_golden.py).
"""
import os
import shutil
import sys

import numpy as np

from refq.errors import RefqError
from refq.machine import cpu_model
from refq.golden import io, spec, steps as steps_mod


def log_stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _fmt_meta(q):
    """The format part of q.meta(): no options (stored apart) and no info (diagnostics)."""
    return {k: io.jsonable(v) for k, v in q.meta().items() if k not in ("options", "info")}


def refq_outputs(method, W, H, options, x, kernel="cpu"):
    """Quantize with refq -> (fields dict, QuantizedWeight): the stored tensors, W_hat, loss, y."""
    from refq.api import layer_loss, quantize_weight
    q = quantize_weight(W, H, method, **options)
    fields = {k: np.asarray(v) for k, v in q.tensors().items()}
    clash = set(fields) & set(spec.RESERVED)
    if clash:
        raise RefqError(f"format {q.FORMAT} has a tensor named {sorted(clash)[0]!r}, "
                        "which the golden suite reserves")
    W_hat = np.asarray(q.dequantize(), dtype=np.float32)
    fields["W_hat"] = W_hat
    fields["loss"] = np.array(layer_loss(W, W_hat, H), dtype=np.float64)
    fields["y"] = np.asarray(q.matmul(x, kernel=kernel), dtype=np.float32)
    return fields, q


def _shape_entry(a):
    a = np.asarray(a)
    return {"dtype": a.dtype.name, "shape": list(a.shape)}


def write_case(tmp, method, label, inp, d, given):
    """Compute one case; write its files under tmp -> manifest entry."""
    from refq.api import validate_options
    case = f"{method}-{label}"
    opts = validate_options(method, dict(given))
    fields, q = refq_outputs(method, d["W"], d["H"], opts, d["x"])
    neutral = spec.neutral_fields(q)
    blob_fields = dict(fields)
    blob_fields.update({f"neutral.{k}": v for k, v in neutral.items()})
    blob = io.safetensors_bytes(blob_fields)
    rel = f"cases/{case}.safetensors"
    with open(os.path.join(tmp, rel), "wb") as f:
        f.write(blob)
    entry = {
        "name": case, "method": method, "input": inp,
        "options": io.jsonable(opts), "format": _fmt_meta(q),
        "bits_per_weight": q.bits_per_weight,
        "file": rel, "sha256": io.sha256(blob), "bytes": len(blob), "y_kernel": "cpu",
        "fields": {k: dict(_shape_entry(v), **spec.stored_tolerance(k, v))
                   for k, v in fields.items() if k not in spec.RESERVED},
        "outputs": {k: _shape_entry(fields[k]) for k in spec.RESERVED},
        "neutral": {k: _shape_entry(v) for k, v in neutral.items()},
        "e2e": {"loss_band": spec.e2e_band(method)},
    }
    st = steps_mod.case_steps(method, np.asarray(d["W"], np.float64), d["H"], opts, q,
                              real=inp == spec.REAL_INPUT)
    if st:
        tensors, listing = {}, []
        for s in st:
            kind = steps_mod.KINDS[s["kind"]]
            ref = kind.reference(s["inputs"], s["params"])
            for k, v in s["inputs"].items():
                if k in s["shared"]:                 # the case's input tensor, as float64
                    src = np.asarray(d[s["shared"][k]], np.float64)
                    assert np.array_equal(src, v), (case, s["id"], k)
                    continue
                tensors[f"{s['id']}.in.{k}"] = v
            for k, v in ref.items():
                tensors[f"{s['id']}.out.{k}"] = np.asarray(v)
            listing.append({"id": s["id"], "kind": s["kind"], "params": io.jsonable(s["params"]),
                            "inputs": {k: dict(_shape_entry(v), **({"from_input": s["shared"][k]}
                                                                   if k in s["shared"] else {}))
                                       for k, v in s["inputs"].items()},
                            "outputs": {k: _shape_entry(v) for k, v in ref.items()}})
        sblob = io.safetensors_bytes(tensors)
        srel = f"steps/{case}.safetensors"
        with open(os.path.join(tmp, srel), "wb") as f:
            f.write(sblob)
        entry["steps"] = {"file": srel, "sha256": io.sha256(sblob), "bytes": len(sblob),
                          "list": listing}
    return entry, q


def write_suite(out_dir, methods=None, model_path=None, real=True, force=False, log=log_stderr):
    """Write a suite into out_dir; -> (n_cases, {method: error}) for the methods that failed."""
    from refq._version import __version__
    try:
        from refq.methods import METHODS
    except Exception as e:
        raise RefqError(f"cannot import the method registry: {type(e).__name__}: {e}") from None
    if methods is None:
        methods = list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    failed = {m: "not registered" for m in unknown}
    methods = [m for m in methods if m in METHODS]

    if os.path.exists(out_dir) and not force:
        raise RefqError(f"{out_dir}: already exists (use --force to replace it)")
    from refq.outdir import check_output, commit, tmp_path    # before any work
    check_output(out_dir, force, lambda d: os.path.isfile(os.path.join(d, "manifest.json")),
                 "no manifest.json", inputs=[model_path], option="golden write", log=log)
    if real and model_path is None:
        from refq.fetch import default_model_path
        p = default_model_path()
        model_path = p if os.path.isfile(os.path.join(p, "config.json")) else None
        if model_path is None:
            log("golden write: SmolLM2 not fetched; the real-layer cases are left out")
    need_real = real and model_path is not None and any(
        inp == spec.R for m in methods for _, inp, _ in spec.cases_for(m))

    inputs, descs = {}, {}
    for name in spec.SYNTHETIC:
        inputs[name], descs[name] = spec.make_synthetic(name)
    if need_real:
        inputs[spec.REAL_INPUT], descs[spec.REAL_INPUT] = spec.make_real(model_path)

    tmp = tmp_path(out_dir)
    os.makedirs(tmp)
    try:
        for sub in ("inputs", "cases", "steps"):
            os.makedirs(os.path.join(tmp, sub))
        cases, used = [], set()
        for method in methods:
            for label, inp, given in spec.cases_for(method):
                inp = spec.REAL_INPUT if inp == spec.R else inp
                if inp not in inputs:
                    continue
                case = f"{method}-{label}"
                try:
                    entry, q = write_case(tmp, method, label, inp, inputs[inp], given)
                except Exception as e:  # a method being written may fail: report, go on
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    failed.setdefault(method, f"case {case}: {msg}")
                    log(f"golden write: {case}: FAILED ({msg})")
                    continue
                cases.append(entry)
                used.add(inp)
                log(f"golden write: {case}: {len(entry['fields'])} stored fields, "
                    f"{len(entry.get('steps', {}).get('list', []))} steps, "
                    f"{q.bits_per_weight:.4f} bits/weight")
        manifest_inputs = {}
        for name in sorted(used):
            blob = io.safetensors_bytes(inputs[name])
            rel = f"inputs/{name}.safetensors"
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(blob)
            manifest_inputs[name] = {
                "file": rel, "sha256": io.sha256(blob), "bytes": len(blob),
                "seed": spec.SYNTHETIC[name][0] if name in spec.SYNTHETIC else None,
                "description": descs[name],
                "tensors": {k: _shape_entry(v) for k, v in inputs[name].items()}}
        manifest = {
            "suite": spec.SUITE, "suite_version": spec.SUITE_VERSION,
            "refq_version": __version__,
            "generated_with": {"numpy": np.__version__, "numba": _numba_version(),
                               "cpu": cpu_model()},
            "tiers": list(spec.TIERS),
            "inputs": manifest_inputs,
            "cases": sorted(cases, key=lambda c: c["name"]),
        }
        with open(os.path.join(tmp, "manifest.json"), "wb") as f:
            f.write(io.dump_json(manifest))
        commit(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return len(cases), failed


def _numba_version():
    try:
        import numba
        return numba.__version__
    except ImportError:
        return None
