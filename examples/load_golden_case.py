"""Load one case of a refq golden suite with numpy + safetensors only (no refq).

    python examples/load_golden_case.py DIR CASE          e.g. data/golden gptq-w3g24-act

It checks the sha256 of the two files, loads the inputs (W, H, x) and the
reference outputs, decodes W_hat from the stored fields for the formats it
knows ("uniform": rtn, gptq; "codebook": claq), and checks, with the
manifest's tolerances, that

    decoded W_hat == stored W_hat,   x @ W_hat.T ~= y,
    trace((W - W_hat) H (W - W_hat)^T) ~= loss.

A port can start from here: replace the reference fields by its own outputs.
Exit 0 and a line "OK ..." when everything agrees.
"""
import hashlib
import json
import os
import sys

import numpy as np
from safetensors.numpy import load


def read(root, entry):
    """Load a file named in the manifest, after checking its sha256."""
    with open(os.path.join(root, entry["file"]), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        sys.exit(f"{entry['file']}: sha256 mismatch")
    return load(data)


def unpack(packed, b, n):
    """uint8 (..., ceil(n*b/8)) -> codes (..., n): little-endian bitstream (FORMAT.md)."""
    bits = np.unpackbits(packed, axis=-1, bitorder="little")[..., :n * b]
    return (bits.reshape(*packed.shape[:-1], n, b).astype(np.int64) << np.arange(b)).sum(-1)


def decode_uniform(t, fmt):
    out, n = fmt["shape"]
    b, g = fmt["bits"], fmt["group_size"] or n
    G = -(-n // g)
    codes = unpack(t["qweight"], b, n)                                     # (out, in)
    zeros = (np.full((out, G), 2 ** (b - 1)) if fmt["sym"]
             else unpack(t["qzeros"], b, out * G).reshape(out, G))           # (out, G)
    grp = np.arange(n) // g
    W = t["scales"].astype(np.float32)[:, grp] * (codes - zeros[:, grp]).astype(np.float32)
    if "perm" in t:                          # stored column k is original column perm[k]
        full = np.empty_like(W)
        full[:, t["perm"].astype(np.int64)] = W
        W = full
    return W


def decode_codebook(t, fmt):
    out, n = fmt["shape"]
    cb = t["column_bits"]
    W = np.zeros((out, n), np.float32)
    for b in np.unique(cb):
        cols = np.flatnonzero(cb == b)                                      # ascending
        codes = unpack(t[f"qweight_{b}"], int(b), len(cols))                # (out, n_b)
        book = t[f"codebook_{b}"].astype(np.float32)                        # (n_b, 2^b)
        W[:, cols] = book[np.arange(len(cols)), codes]
    if "outlier_rowptr" in t:                # CSR outliers, added to the codebook value
        rowptr = t["outlier_rowptr"].astype(np.int64)
        rows = np.repeat(np.arange(out), np.diff(rowptr))
        W[rows, t["outlier_cols"].astype(np.int64)] += t["outlier_values"].astype(np.float32)
    return W


DECODERS = {"uniform": decode_uniform, "codebook": decode_codebook}


def close(name, got, ref, spec):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.abs(got - ref)
    ok = bool(np.all(err <= spec["atol"] + spec["rtol"] * np.abs(ref)))
    print(f"  {name}: max abs err {err.max():.3g} ({'ok' if ok else 'OUT OF TOLERANCE'})")
    return ok


def main(root, case_name):
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("suite") != "refq-golden" or manifest.get("suite_version") != 1:
        sys.exit(f"unknown suite {manifest.get('suite')!r} version {manifest.get('suite_version')!r}")
    case = next((c for c in manifest["cases"] if c["name"] == case_name), None)
    if case is None:
        sys.exit(f"no case {case_name!r} (cases: {', '.join(c['name'] for c in manifest['cases'])})")
    inp = read(root, manifest["inputs"][case["input"]])     # W (out, in) f32, H (in, in) f64, x (T, in) f32
    ref = read(root, case)                                  # every field of the case
    W, H, x = inp["W"], inp["H"], inp["x"]
    fmt, fields = case["format"], case["fields"]
    print(f"{case_name}: method {case['method']}, format {fmt['format']}, W {W.shape}, "
          f"options {json.dumps(case['options'], sort_keys=True)}")
    for k, spec in sorted(fields.items()):                  # dtype and shape as the manifest says
        assert ref[k].dtype.name == spec["dtype"] and list(ref[k].shape) == spec["shape"], k
    ok = True
    W_hat = ref["W_hat"]
    if fmt["format"] in DECODERS:
        decoded = DECODERS[fmt["format"]](ref, fmt)
        ok &= close("W_hat decoded from the stored fields", decoded, W_hat, fields["W_hat"])
    else:
        print(f"  (no decoder here for format {fmt['format']!r}; using the stored W_hat)")
    E = W.astype(np.float64) - W_hat.astype(np.float64)
    ok &= close("loss", np.sum((E @ H) * E), ref["loss"], fields["loss"])
    ok &= close("y = x @ W_hat.T", x @ W_hat.T, ref["y"], fields["y"])
    if not ok:
        sys.exit(f"FAILED {case_name}")
    print(f"OK {case_name}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
