"""Golden fixtures: seeded inputs and refq's outputs, for checking other implementations.

    refq golden write DIR [--methods M ...] [--model PATH | --no-real] [--force]
    refq golden verify DIR [--impl MODULE:FUNCTION] [--kernel cpu|dequant|gpu]
                           [--methods M ...] [--cases NAME ...] [--json]

A suite is a folder (see GOLDEN.md for the full specification):

    DIR/manifest.json                 suite version, refq version, inputs, cases,
                                      per-field dtype / shape / tolerance, sha256
    DIR/inputs/<input>.safetensors    W (out, in) float32, H (in, in) float64,
                                      x (T, in) float32
    DIR/cases/<case>.safetensors      one tensor per output field: every tensor
                                      of the QuantizedWeight (tensors()), W_hat
                                      (out, in) float32, loss () float64,
                                      y (T, out) float32 = x @ W_hat.T by the kernel

Writing is deterministic: no timestamps, sorted JSON keys, safetensors files
written by hand here (header keys sorted, no metadata), the same seeds; two
writes on the same machine give byte-identical folders (tests/test_golden.py).

Verification recomputes every case with refq (or with another implementation,
`--impl MODULE:FUNCTION`, called as fn(method, W, H, options) -> {field: array};
if fn accepts a keyword `x` it also gets the case's x and may return "y") and
compares field by field with the tolerance stored in the manifest.  Every
problem (missing or truncated file, sha256 mismatch, unknown suite version, an
impl that raises or returns a wrong shape) fails that case only; the other
cases still run; the exit code is 1 if any case failed.
"""
import hashlib
import importlib
import inspect
import json
import os
import shutil
import struct
import sys

import numpy as np

from refq.errors import RefqError

SUITE = "refq-golden"
SUITE_VERSION = 1
KNOWN_SUITE_VERSIONS = (1,)
RESERVED = ("W_hat", "loss", "y")       # fields that are not tensors() of the format
T_TOKENS = 4                            # rows of x (below the CPU kernels' BLAS threshold)

# ============================================================================ inputs
# Synthetic inputs: name -> (seed, out, in).  Every one is regenerated from its
# seed at write time and stored, so verify never regenerates them.
SYNTHETIC = {
    "gauss-24x64": (1, 24, 64),
    "edge-48x128": (2, 48, 128),
}
REAL_INPUT = "smollm2-l0-q_proj-48x128"   # only when the model is available
REAL_TOKENS = 256


def _hessian(X):
    """H = mean x xᵀ in float64.  X (n, in)."""
    X = X.astype(np.float64)
    return (X.T @ X) / X.shape[0]


def make_synthetic(name):
    """-> (dict W, H, x, description) for a SYNTHETIC input, from its seed alone."""
    seed, out, n = SYNTHETIC[name]
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, n)) * 0.05).astype(np.float32)
    # correlated activations with per-channel scales (a few large channels)
    mix = rng.standard_normal((n, n)) / np.sqrt(n)
    X = rng.standard_normal((8 * n, n)) @ (np.eye(n) + 0.5 * mix)
    X *= np.exp(rng.standard_normal(n) * 0.5)
    desc = "Gaussian W (sigma 0.05); H from 8*in correlated activations with log-normal channel scales"
    if name.startswith("edge"):
        s = 0.05
        W[:, 5] = 0.0                                  # a zero column
        W[3, :] = np.float32(0.37)                     # a constant row
        W[7, 11] = np.float32(40 * s)                  # huge outliers
        W[10, 40] = np.float32(-80 * s)
        W[20, 100] = np.float32(25 * s)
        levels = np.array([-0.1, -0.05, 0.0, 0.05, 0.1], np.float32)
        W[12, :] = levels[rng.integers(0, 5, n)]       # ties: few distinct values
        half = rng.standard_normal(n // 2).astype(np.float32) * s
        W[13, :] = np.repeat(half, 2)                  # ties: every value twice
        W[14, :] = -W[13, :]                           # equal magnitudes, opposite signs
        X[:, 9] = 0.0                                  # a dead input channel (H row/col 9 = 0)
        X[:, 21] = X[:, 20]                            # two identical channels (ties in diag H)
        X[:, 60] *= 30.0                               # one dominant activation channel
        desc = ("Gaussian W (sigma 0.05) with column 5 zero, row 3 constant 0.37, outliers "
                "W[7,11]=+40s W[10,40]=-80s W[20,100]=+25s, row 12 from 5 levels, row 13 "
                "pairs of equal values, row 14 = -row 13; H with channel 9 dead, channels "
                "20 and 21 identical, channel 60 scaled by 30")
    x = rng.standard_normal((T_TOKENS, n)).astype(np.float32)
    return {"W": W, "H": _hessian(X), "x": x}, desc


def make_real(model_path):
    """A 48x128 slice of SmolLM2 layer 0's q_proj; H from its real inputs.

    X = input_layernorm(embed(first REAL_TOKENS tokens of data/calib.txt))[:, :128].
    """
    from llama_np import Tokenizer, load_model
    from llama_np.model import rms_norm
    model, tok = load_model(model_path), Tokenizer(model_path)
    calib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "data", "calib.txt")
    with open(calib, encoding="utf-8") as f:
        ids = tok.encode(f.read(20_000))[:REAL_TOKENS]
    layer = model.layers[0]
    h = rms_norm(model.embed(ids), layer.input_norm, model.cfg.rms_norm_eps)   # (T, d)
    W = np.ascontiguousarray(layer.linears["self_attn.q_proj"].dequantize()[:48, :128],
                             dtype=np.float32)
    X = h[:, :128]
    x = np.ascontiguousarray(h[-T_TOKENS:, :128], dtype=np.float32)
    desc = (f"SmolLM2-135M-Instruct layer 0 self_attn.q_proj[:48, :128]; H = mean x x^T of "
            f"input_layernorm(embed(first {REAL_TOKENS} tokens of data/calib.txt))[:, :128]; "
            f"x = the last {T_TOKENS} of those rows")
    return {"W": W, "H": _hessian(X), "x": x}, desc


# ============================================================================ cases
# method -> [(label, input, options)].  Options are the explicit ones; the
# manifest stores the complete validated options, so a later change of a
# default does not change what a case means.  "REAL" = the SmolLM2 slice.
G, E, R = "gauss-24x64", "edge-48x128", "REAL"
CASES = {
    "rtn": [("w4", G, dict(bits=4)),
            ("w3g24-sym", G, dict(bits=3, group_size=24, sym=True)),      # ragged last group
            ("w4g32-mse", E, dict(bits=4, group_size=32, mse=True)),
            ("w2g64", R, dict(bits=2, group_size=64))],
    "gptq": [("w4", G, dict(bits=4, blocksize=16)),
             ("w3g24-act", G, dict(bits=3, group_size=24, act_order=True, blocksize=16)),
             ("w3g32-act-static", E, dict(bits=3, group_size=32, act_order=True,
                                          static_groups=True, blocksize=32)),
             ("w4g32-act", R, dict(bits=4, group_size=32, act_order=True, blocksize=32))],
    "claq": [("b3", G, dict(bits=3, ap=False, blocksize=16)),
             ("ap2.5-or", E, dict(bits=2.5, outlier_reservation=True, blocksize=32)),
             ("ap3", R, dict(bits=3, blocksize=32))],
    "quantease": [("w4", G, dict(bits=4, iters=5)),
                  ("w3g32-outliers", E, dict(bits=3, group_size=32, iters=5, outlier_frac=0.01)),
                  ("w3g32-real", R, dict(bits=3, group_size=32, iters=5))],
    "spqr": [("w3g16", G, dict(bits=3)),
             ("w3g16-edge", E, dict(bits=3)),
             ("w3g16-real", R, dict(bits=3))],
    "squeezellm": [("w3", G, dict(bits=3)),
                   ("w3-sparse", E, dict(bits=3, sensitive_frac=0.01)),
                   ("w4-sparse-real", R, dict(bits=4, sensitive_frac=0.005))],
    "aqlm": [("2x6g8", G, dict(num_codebooks=2, nbits_per_codebook=6, in_group_size=8,
                               max_iters=3, seed=0)),
             ("1x8g4-edge", E, dict(num_codebooks=1, nbits_per_codebook=8, in_group_size=4,
                                    max_iters=2, seed=0)),
             ("2x6g8-real", R, dict(num_codebooks=2, nbits_per_codebook=6, in_group_size=8,
                                    max_iters=2, seed=0))],
    "slim-quant": [("w4", G, dict(bits=4)), ("w4-edge", E, dict(bits=4)),
                   ("w3-real", R, dict(bits=3))],
    "slim": [("w4-24", G, dict(bits=4, rank_ratio=0.1, adapter_group_size=32)),
             ("w4-24-edge", E, dict(bits=4, rank_ratio=0.1, adapter_group_size=32)),
             ("w4-24-real", R, dict(bits=4, rank_ratio=0.1, adapter_group_size=32))],
    "wanda": [("24", G, dict()), ("24-edge", E, dict()), ("24-real", R, dict())],
    "sparsegpt": [("24", G, dict(blocksize=16)), ("24-edge", E, dict(blocksize=32)),
                  ("24-real", R, dict(blocksize=32))],
    "magnitude": [("24", G, dict()), ("24-edge", E, dict())],
}
DEFAULT_CASES = [("default", G, {})]    # a registered method not listed above


def cases_for(method):
    return CASES.get(method, DEFAULT_CASES)


# ============================================================================ tolerances
def tolerance(name, ref, W_hat=None, x=None, W=None, H=None):
    """The comparison rule of one field, from its reference value.

    -> {"compare": "exact"} or {"compare": "allclose", "atol", "rtol"}, with "reason".
    |got - ref| <= atol + rtol * |ref| elementwise (NaN only equals NaN).
    """
    ref = np.asarray(ref)
    if ref.dtype.kind in "biu":
        return {"compare": "exact",
                "reason": "integer / packed field (codes, indices, zero points, bit "
                          "widths, permutations): any difference is a different quantization"}
    if name == "W_hat":
        m = float(np.max(np.abs(ref))) if ref.size else 0.0
        return {"compare": "allclose", "atol": m * 2.0 ** -16, "rtol": 2.0 ** -10,
                "reason": "float32, computed from the stored fields: refq reproduces it bit for "
                          "bit; a port may differ by one float16 ulp (2^-10 relative) of a "
                          "stored scale/centroid, or by float32 rounding of a sum of products "
                          "(2^-16 * max|W_hat|); one code step is always larger"}
    if name == "loss":
        E = W.astype(np.float64)
        scale = float(np.sum((E @ H) * E))          # trace(W H Wᵀ), the loss of W_hat = 0
        return {"compare": "allclose", "atol": max(scale, 1e-30) * 1e-9, "rtol": 1e-5,
                "reason": "float64 trace((W - W_hat) H (W - W_hat)^T): summation order depends "
                          "on BLAS; rtol also absorbs W_hat's tolerance; atol = 1e-9 * "
                          "trace(W H W^T) for a loss of 0"}
    if name == "y":
        bound = float(np.max(np.abs(x.astype(np.float64)) @ np.abs(W_hat.astype(np.float64)).T))
        return {"compare": "allclose", "atol": bound * 2.0 ** -12, "rtol": 2.0 ** -10,
                "reason": "float32 dot products of length in: numba, BLAS and CUDA sum in "
                          "different orders (error <= in * 2^-24 * sum|x||w|); atol = 2^-12 * "
                          "max_t,r sum_c |x[t,c]| |W_hat[r,c]|, rtol follows W_hat's"}
    if ref.dtype == np.float16:
        return {"compare": "allclose", "atol": 2.0 ** -24, "rtol": 2.0 ** -10,
                "reason": "stored as float16: refq reproduces it bit for bit; a port computing "
                          "it in another precision may round to the neighbouring float16 "
                          "(one ulp = 2^-10 relative; atol = the smallest float16 subnormal)"}
    m = float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else 0.0
    return {"compare": "allclose", "atol": m * 2.0 ** -20, "rtol": 2.0 ** -16,
            "reason": f"stored as {ref.dtype.name}, computed by float arithmetic: a port's "
                      "summation order may move the last bits (2^-16 relative, 2^-20 * max|ref|)"}


# ============================================================================ safetensors, by hand
_ST = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
       "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAME = {np.dtype(v): k for k, v in _ST.items()}


def safetensors_bytes(tensors):
    """A safetensors file: tensors in sorted name order, no metadata, header
    padded with spaces to a multiple of 8.  Deterministic for equal inputs."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype not in _ST_NAME:
            raise RefqError(f"golden: field {name}: dtype {a.dtype} cannot be stored")
        raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_NAME[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def load_safetensors(path):
    """-> dict name -> ndarray (RefqError naming the file if it is missing or corrupt)."""
    from safetensors.numpy import load
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RefqError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise RefqError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _jsonable(v):
    """Options to strict JSON: non-finite floats as {"$float": "inf"}."""
    if isinstance(v, float) and not np.isfinite(v):
        return {"$float": repr(v)}
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _from_json(v):
    if isinstance(v, dict):
        if set(v) == {"$float"}:
            return float(v["$float"])
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def dump_json(obj):
    return (json.dumps(obj, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=True)
            + "\n").encode("utf-8")


# ============================================================================ computing a case
def _fmt_meta(q):
    """The format part of q.meta(): no options (stored apart) and no info (diagnostics)."""
    return {k: _jsonable(v) for k, v in q.meta().items() if k not in ("options", "info")}


def refq_outputs(method, W, H, options, x, kernel="cpu"):
    """Quantize with refq -> (fields dict, QuantizedWeight)."""
    from refq.api import layer_loss, quantize_weight
    q = quantize_weight(W, H, method, **options)
    fields = {k: np.asarray(v) for k, v in q.tensors().items()}
    clash = set(fields) & set(RESERVED)
    if clash:
        raise RefqError(f"format {q.FORMAT} has a tensor named {sorted(clash)[0]!r}, "
                        "which the golden suite reserves")
    W_hat = np.asarray(q.dequantize(), dtype=np.float32)
    fields["W_hat"] = W_hat
    fields["loss"] = np.array(layer_loss(W, W_hat, H), dtype=np.float64)
    fields["y"] = np.asarray(q.matmul(x, kernel=kernel), dtype=np.float32)
    return fields, q


# ============================================================================ write
def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def write_suite(out_dir, methods=None, model_path=None, real=True, force=False, log=_log):
    """Write a suite into out_dir; -> (n_cases, {method: error}) for the methods that failed."""
    import refq
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
        inp == R for m in methods for _, inp, _ in cases_for(m))

    inputs, descs = {}, {}
    for name in SYNTHETIC:
        inputs[name], descs[name] = make_synthetic(name)
    if need_real:
        inputs[REAL_INPUT], descs[REAL_INPUT] = make_real(model_path)

    tmp = tmp_path(out_dir)
    os.makedirs(tmp)
    try:
        os.makedirs(os.path.join(tmp, "inputs"))
        os.makedirs(os.path.join(tmp, "cases"))
        cases, used = [], set()
        for method in methods:
            for label, inp, given in cases_for(method):
                inp = REAL_INPUT if inp == R else inp
                if inp not in inputs:
                    continue
                case = f"{method}-{label}"
                d = inputs[inp]
                try:
                    from refq.api import validate_options
                    opts = validate_options(method, dict(given))
                    fields, q = refq_outputs(method, d["W"], d["H"], opts, d["x"])
                except Exception as e:  # a method being written may fail: report, go on
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    failed.setdefault(method, f"case {case}: {msg}")
                    log(f"golden write: {case}: FAILED ({msg})")
                    continue
                blob = safetensors_bytes(fields)
                rel = f"cases/{case}.safetensors"
                with open(os.path.join(tmp, rel), "wb") as f:
                    f.write(blob)
                cases.append({
                    "name": case, "method": method, "input": inp,
                    "options": _jsonable(opts), "format": _fmt_meta(q),
                    "bits_per_weight": q.bits_per_weight,
                    "file": rel, "sha256": _sha256(blob), "bytes": len(blob),
                    "y_kernel": "cpu",
                    "fields": {k: dict(dtype=v.dtype.name, shape=list(v.shape),
                                       **tolerance(k, v, fields["W_hat"], d["x"], d["W"], d["H"]))
                               for k, v in fields.items()},
                })
                used.add(inp)
                log(f"golden write: {case}: {len(fields)} fields, "
                    f"{q.bits_per_weight:.4f} bits/weight")
        manifest_inputs = {}
        for name in sorted(used):
            blob = safetensors_bytes(inputs[name])
            rel = f"inputs/{name}.safetensors"
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(blob)
            manifest_inputs[name] = {
                "file": rel, "sha256": _sha256(blob), "bytes": len(blob),
                "seed": SYNTHETIC[name][0] if name in SYNTHETIC else None,
                "description": descs[name],
                "tensors": {k: {"dtype": v.dtype.name, "shape": list(v.shape)}
                            for k, v in inputs[name].items()}}
        manifest = {
            "suite": SUITE, "suite_version": SUITE_VERSION, "refq_version": refq.__version__,
            "generated_with": {"numpy": np.__version__, "numba": _numba_version()},
            "tolerance_rule": "exact: equal values and shape; allclose: equal shape and "
                              "|got - ref| <= atol + rtol * |ref| elementwise, in float64",
            "inputs": manifest_inputs,
            "cases": sorted(cases, key=lambda c: c["name"]),
        }
        with open(os.path.join(tmp, "manifest.json"), "wb") as f:
            f.write(dump_json(manifest))
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


# ============================================================================ verify
def load_impl(spec):
    """'package.module:function' -> the function (RefqError if it cannot be loaded)."""
    if not spec or ":" not in spec:
        raise RefqError(f"--impl {spec!r}: expected MODULE:FUNCTION")
    mod_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise RefqError(f"--impl {spec}: cannot import {mod_name} "
                        f"({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise RefqError(f"--impl {spec}: {mod_name} has no function {fn_name!r}")
    return fn


def _accepts_x(fn):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "x" or p.kind == p.VAR_KEYWORD for p in params)


def _code_layout(name, fmt, shape):
    """(bits, codes per row) of a packed field, for counting differing codes; None if unknown."""
    f = fmt.get("format")
    out, n = shape
    if f in ("uniform", "uniform_sparse") and "bits" in fmt:
        b = fmt["bits"]
        if name == "qweight":
            return b, n
        if name == "qzeros":
            g = fmt.get("group_size") or n
            return b, out * (-(-n // g))
    return None


def compare_field(name, got, spec, fmt, col_bits=None):
    """-> dict(ok, msg, max_abs, max_rel, n_diff, n) for one field."""
    want_shape = tuple(spec["shape"])
    got = np.asarray(got)
    if tuple(got.shape) != want_shape:
        return dict(ok=False, msg=f"{name}: shape {tuple(got.shape)}, expected {want_shape}")
    ref = spec["_ref"]
    r = {"n": int(ref.size)}
    if spec["compare"] == "exact":
        if got.dtype.kind not in "biu":
            return dict(ok=False, msg=f"{name}: dtype {got.dtype}, expected an integer "
                                      f"field ({spec['dtype']})", **r)
        diff = got.astype(np.int64) != ref.astype(np.int64)
        r["n_diff"] = int(np.count_nonzero(diff))
        r["max_abs"] = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) \
            if ref.size else 0.0
        r["max_rel"] = None
        r["ok"] = r["n_diff"] == 0
        if not r["ok"]:
            unit = "elements"
            layout = _code_layout(name, fmt, fmt.get("shape", (0, 0)))
            if layout is None and name.startswith("qweight_") and col_bits is not None:
                b = int(name.split("_", 1)[1])
                layout = (b, int(np.count_nonzero(col_bits == b)))
            if layout is not None and got.dtype == np.uint8:
                from refq.formats.packing import unpack
                try:
                    b, n = layout
                    cg, cr = unpack(got.astype(np.uint8), b, n), unpack(ref, b, n)
                    r["n_diff_codes"] = int(np.count_nonzero(cg != cr))
                    unit = f"bytes ({r['n_diff_codes']} of {cr.size} codes)"
                except RefqError:
                    pass
            r["msg"] = f"{name}: {r['n_diff']} of {ref.size} {unit} differ"
        return r
    g64, r64 = got.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(g64) & np.isnan(r64)
    err = np.where(both_nan, 0.0, np.abs(g64 - r64))
    err = np.where(np.isnan(err), np.inf, err)
    bound = spec["atol"] + spec["rtol"] * np.abs(r64)
    bad = err > bound
    r["n_diff"] = int(np.count_nonzero(bad))
    r["max_abs"] = float(np.max(err)) if err.size else 0.0
    rel = err / np.maximum(np.abs(r64), np.finfo(np.float64).tiny)
    r["max_rel"] = float(np.max(np.where(err == 0, 0.0, rel))) if err.size else 0.0
    r["ok"] = r["n_diff"] == 0
    if not r["ok"]:
        r["msg"] = (f"{name}: {r['n_diff']} of {ref.size} values outside atol {spec['atol']:.3g}"
                    f" + rtol {spec['rtol']:.3g}*|ref| (max abs err {r['max_abs']:.3g}, "
                    f"max rel err {r['max_rel']:.3g})")
    return r


def _read_checked(root, entry, what):
    """Load a file named by a manifest entry after checking its sha256."""
    rel = entry.get("file")
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.split("/"):
        raise RefqError(f"{what}: bad file entry {rel!r} in manifest.json")
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise RefqError(f"{what}: {rel}: missing")
    with open(path, "rb") as f:
        data = f.read()
    if _sha256(data) != entry.get("sha256"):
        raise RefqError(f"{what}: {rel}: sha256 mismatch ({len(data)} bytes, manifest says "
                        f"{entry.get('bytes')}): the file was changed or truncated")
    from safetensors.numpy import load
    try:
        return load(data)
    except Exception as e:
        raise RefqError(f"{what}: {rel}: not a valid safetensors file "
                        f"({str(e).splitlines()[0]})") from None


def read_manifest(root):
    path = os.path.join(root, "manifest.json")
    if not os.path.isdir(root):
        raise RefqError(f"{root}: no such folder")
    if not os.path.isfile(path):
        raise RefqError(f"{path}: missing (not a golden suite)")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise RefqError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("cases"), list) \
            or not isinstance(m.get("inputs"), dict):
        raise RefqError(f"{path}: not a golden manifest (no 'cases' list / 'inputs' object)")
    return m


def verify_suite(root, impl=None, kernel="cpu", methods=None, cases=None, log=_log):
    """Verify every case -> list of per-case result dicts (ok, name, method, error, fields)."""
    m = read_manifest(root)
    version = m.get("suite_version")
    version_err = None
    if m.get("suite") != SUITE or version not in KNOWN_SUITE_VERSIONS:
        version_err = (f"unknown suite {m.get('suite')!r} version {version!r} (this refq reads "
                       f"{SUITE} version(s) {', '.join(map(str, KNOWN_SUITE_VERSIONS))})")
    fn = load_impl(impl) if impl else None
    pass_x = fn is not None and _accepts_x(fn)
    input_cache = {}
    results = []
    for case in m["cases"]:
        name = case.get("name", "?") if isinstance(case, dict) else "?"
        method = case.get("method") if isinstance(case, dict) else None
        if methods and method not in methods:
            continue
        if cases and name not in cases:
            continue
        res = {"name": name, "method": method, "ok": False, "error": None, "fields": {}}
        results.append(res)
        try:
            if version_err:
                raise RefqError(version_err)
            inp = case["input"]
            if inp not in input_cache:
                try:
                    input_cache[inp] = _read_checked(root, m["inputs"][inp], f"input {inp}")
                except KeyError:
                    input_cache[inp] = RefqError(f"input {inp!r} is not in the manifest")
                except RefqError as e:
                    input_cache[inp] = e
            d = input_cache[inp]
            if isinstance(d, Exception):
                raise d
            ref = _read_checked(root, case, f"case {name}")
            specs = case["fields"]
            for k, spec in specs.items():
                if k not in ref:
                    raise RefqError(f"case {name}: field {k} missing from {case['file']}")
                spec["_ref"] = ref[k]
            options = _from_json(case["options"])
            W, H, x = d["W"], d["H"], d["x"]
            if fn is None:
                from refq.methods import METHODS
                if method not in METHODS:
                    res["skipped"] = True
                    res["error"] = f"method {method!r} is not registered in this refq"
                    continue
                got, _ = refq_outputs(method, W, H, options, x, kernel=kernel)
            else:
                try:
                    kw = {"x": x.copy()} if pass_x else {}
                    got = fn(method, W.copy(), H.copy(), dict(options), **kw)
                except Exception as e:
                    raise RefqError(f"--impl raised {type(e).__name__}: {e}") from None
                if not isinstance(got, dict):
                    raise RefqError(f"--impl returned {type(got).__name__}, expected a dict "
                                    "of field arrays")
            fmt = case.get("format", {})
            col_bits = got.get("column_bits") if isinstance(got.get("column_bits"), np.ndarray) \
                else ref.get("column_bits")
            problems = []
            for k in sorted(specs):
                if k not in got:
                    if fn is not None and k == "y" and not pass_x:
                        continue       # an impl without an x parameter cannot compute y
                    problems.append(f"{k}: not returned")
                    res["fields"][k] = {"ok": False, "msg": f"{k}: not returned"}
                    continue
                try:
                    fr = compare_field(k, got[k], specs[k], fmt, col_bits)
                except Exception as e:
                    fr = {"ok": False, "msg": f"{k}: cannot compare ({type(e).__name__}: {e})"}
                res["fields"][k] = fr
                if not fr["ok"]:
                    problems.append(fr["msg"])
            extra = sorted(set(got) - set(specs))
            if extra and fn is None:
                problems.append(f"unexpected field(s) {', '.join(extra)} (the stored format changed)")
            res["ok"] = not problems
            if problems:
                res["error"] = "; ".join(problems)
        except RefqError as e:
            res["error"] = str(e)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            for spec in (case.get("fields") or {}).values() if isinstance(case, dict) else ():
                if isinstance(spec, dict):
                    spec.pop("_ref", None)
    return results


def _summary_line(r):
    if r.get("skipped"):
        return f"SKIP {r['name']}: {r['error']}"
    fs = [f for f in r["fields"].values() if "max_abs" in f]
    mabs = max((f["max_abs"] for f in fs), default=0.0)
    mrel = max((f["max_rel"] or 0.0 for f in fs), default=0.0)
    ndiff = sum(f.get("n_diff", 0) for f in fs if f.get("max_rel") is None)
    stats = f"{len(r['fields'])} fields, max abs err {mabs:.3g}, max rel err {mrel:.3g}, " \
            f"differing ints {ndiff}"
    if r["ok"]:
        return f"PASS {r['name']}: {stats}"
    return f"FAIL {r['name']}: {r['error']}" + (f" [{stats}]" if r["fields"] else "")


# ============================================================================ CLI
def add_commands(sub):
    s = sub.add_parser("golden", help="write / verify golden fixtures (GOLDEN.md)")
    gs = s.add_subparsers(dest="golden_what", metavar="WHAT", parser_class=type(s))
    gs.required = True
    w = gs.add_parser("write", help="write a golden suite into DIR")
    w.add_argument("dir", metavar="DIR")
    w.add_argument("--methods", nargs="+", metavar="M",
                   help="methods to include (default: every registered one)")
    w.add_argument("--model", help="SmolLM2 HF folder for the real-layer cases "
                   "(default: the fetched one, if any)")
    w.add_argument("--no-real", action="store_true", help="leave out the real-layer cases")
    w.add_argument("--force", action="store_true", help="replace DIR if it exists")
    w.set_defaults(func=cmd_golden_write)
    v = gs.add_parser("verify", help="check refq (or --impl) against a golden suite")
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--impl", metavar="MODULE:FUNCTION",
                   help="another implementation: fn(method, W, H, options[, x=x]) -> "
                   "dict field -> array (GOLDEN.md)")
    v.add_argument("--kernel", choices=("cpu", "gpu", "dequant"), default="cpu",
                   help="kernel that computes y with refq (default cpu)")
    v.add_argument("--methods", nargs="+", metavar="M", help="only these methods")
    v.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases")
    v.add_argument("--json", action="store_true", help="print the results as one JSON object")
    v.set_defaults(func=cmd_golden_verify)


def cmd_golden_write(args):
    n, failed = write_suite(args.dir, methods=args.methods, model_path=args.model,
                            real=not args.no_real, force=args.force)
    _log(f"golden write: {n} cases written to {args.dir}")
    for m, why in sorted(failed.items()):
        _log(f"golden write: method {m} left out: {why}")
    return 0


def cmd_golden_verify(args):
    if args.impl:
        load_impl(args.impl)          # a bad --impl is a usage error (exit 2), before any case
    results = verify_suite(args.dir, impl=args.impl, kernel=args.kernel,
                           methods=args.methods, cases=args.cases)
    for r in results:
        _log(_summary_line(r))
    n_fail = sum(1 for r in results if not r["ok"] and not r.get("skipped"))
    n_skip = sum(1 for r in results if r.get("skipped"))
    _log(f"golden verify: {len(results) - n_fail - n_skip} passed, {n_fail} failed, "
         f"{n_skip} skipped")
    if args.json:
        print(json.dumps({"passed": n_fail == 0 and len(results) > n_skip,
                          "cases": results}, sort_keys=True))
    if not results or len(results) == n_skip:
        _log("golden verify: no case was verified")
        return 1
    return 1 if n_fail else 0
