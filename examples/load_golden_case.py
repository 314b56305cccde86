"""Load one case of a refq golden suite (version 2) with numpy + safetensors only (no refq).

    python examples/load_golden_case.py DIR CASE          e.g. data/golden gptq-w3g24-act

It checks the sha256 of the files, loads the inputs (W, H, x), the reference
outputs and the neutral form of the quantization (GOLDEN.md, "Neutral form"),
decodes W_hat from the neutral fields for every format that has one, and
checks, with the suite's tolerance rules, that

    decoded W_hat ~= stored W_hat,   x @ W_hat.T ~= y,
    trace((W - W_hat) H (W - W_hat)^T) ~= loss,

then lists the case's teacher-forced steps (inputs and outputs).  A port can
start from here: replace the decoder by its own (examples/gptq_port.py is a
complete port of RTN and GPTQ).  Exit 0 and a line "OK ..." when everything agrees.
"""
import hashlib
import json
import os
import sys

import numpy as np
from safetensors.numpy import load

U = 2.0 ** -24                      # float32 unit roundoff


def read(root, entry):
    """Load a file named in the manifest, after checking its sha256."""
    with open(os.path.join(root, entry["file"]), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        sys.exit(f"{entry['file']}: sha256 mismatch")
    return load(data)


def decode(fmt, d):
    """Neutral fields -> (W_hat float32, magnitude of the terms, number of roundings)."""
    f = fmt["format"]
    if f in ("uniform", "uniform_sparse"):
        g = d["g_idx"].astype(np.int64)
        W = d["scales"][:, g] * (d["codes"].astype(np.float32) - d["zeros"][:, g])
        S = d.get("outliers", np.zeros_like(W))
        return W + S, np.abs(W) + np.abs(S), 2
    if f == "codebook":
        W = d["centroids"][np.arange(d["codes"].shape[1])[None, :], d["codes"]]
        return W + d["outliers"], np.abs(W) + np.abs(d["outliers"]), 1
    if f == "row_lut":
        W = np.take_along_axis(d["lut"], d["codes"].astype(np.int64), axis=1)
        return W + d["outliers"], np.abs(W) + np.abs(d["outliers"]), 1
    if f == "additive":
        codes, C = d["codes"], d["codebooks"]                   # (out, K, M), (M, nc, g)
        out, K, M = codes.shape
        acc = sum(C[m][codes[:, :, m]] for m in range(M))        # (out, K, g), in order m
        mag = sum(np.abs(C[m][codes[:, :, m]]) for m in range(M))
        s = d["scales"][:, None, None]
        return (s * acc).reshape(out, -1), (np.abs(s) * mag).reshape(out, -1), M + 1
    return None


def check(name, got, ref, tol):
    err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    ok = bool(np.all(err <= tol))
    print(f"  {name}: max abs err {err.max():.3g} ({'ok' if ok else 'OUT OF TOLERANCE'})")
    return ok


def main(root, case_name):
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("suite") != "refq-golden" or manifest.get("suite_version") != 2:
        sys.exit(f"unknown suite {manifest.get('suite')!r} version {manifest.get('suite_version')!r}")
    case = next((c for c in manifest["cases"] if c["name"] == case_name), None)
    if case is None:
        sys.exit(f"no case {case_name!r} (cases: {', '.join(c['name'] for c in manifest['cases'])})")
    inp = read(root, manifest["inputs"][case["input"]])     # W (out, in) f32, H (in, in) f64, x (T, in) f32
    ref = read(root, case)                                  # stored fields, outputs, neutral.*
    W, H, x = inp["W"], inp["H"], inp["x"]
    fmt = case["format"]
    print(f"{case_name}: method {case['method']}, format {fmt['format']}, W {W.shape}, "
          f"options {json.dumps(case['options'], sort_keys=True)}")
    neutral = {k[len("neutral."):]: v for k, v in ref.items() if k.startswith("neutral.")}
    for k, spec in case["neutral"].items():                 # dtype and shape as the manifest says
        assert neutral[k].dtype.name == spec["dtype"] and list(neutral[k].shape) == spec["shape"], k
    ok = True
    W_hat = ref["W_hat"]
    tau = np.zeros(W_hat.shape)
    dec = decode(fmt, neutral) if neutral else None
    if dec is not None:
        tau = dec[2] * U * dec[1]                           # GOLDEN.md: W_hat tolerance
        ok &= check("W_hat decoded from the neutral fields", dec[0], W_hat, tau)
    else:
        print(f"  (format {fmt['format']!r} has no neutral form; using the stored W_hat)")
    E = W.astype(np.float64) - W_hat.astype(np.float64)
    ax, n = np.abs(x.astype(np.float64)), W.shape[1]
    gam = (n + 1) * U / (1 - (n + 1) * U)
    ok &= check("y = x @ W_hat.T", x @ W_hat.T, ref["y"],
                2 * gam * (ax @ np.abs(W_hat.astype(np.float64)).T) + ax @ tau.T)
    g64 = (2 * n + 1) * 2.0 ** -53
    loss_tol = 2 * np.sum(tau * np.abs(E @ H)) + np.sum((tau @ np.abs(H)) * tau) \
        + 2 * g64 * np.sum((np.abs(E) @ np.abs(H)) * np.abs(E)) + 1e-300
    ok &= check("loss", np.sum((E @ H) * E), ref["loss"], loss_tol)
    if "steps" in case:
        st = read(root, case["steps"])
        for s in case["steps"]["list"]:
            ins = ", ".join(f"{k} {tuple(v['shape'])}" + (" (= the input's)" if "from_input" in v else "")
                            for k, v in s["inputs"].items())
            outs = ", ".join(f"{k} {tuple(st[s['id'] + '.out.' + k].shape)}" for k in s["outputs"])
            print(f"  step {s['id']} ({s['kind']}): {ins}; params {s['params']} -> {outs}")
    if not ok:
        sys.exit(f"FAILED {case_name}")
    print(f"OK {case_name}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
