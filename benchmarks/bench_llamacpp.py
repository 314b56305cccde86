"""refq's GGUF exports run by llama.cpp itself (BENCHMARKS.md, "Interop vs llama.cpp itself").

    python benchmarks/bench_llamacpp.py --llama-cpp-dir BUILD/bin --work DIR \\
        --ckpt "rtn w4 g32 sym=CKPT" [--ckpt LABEL=CKPT ...] [--model HF_FOLDER] \\
        [--text data/eval.txt] [--ctx 512] [--threads 1]

Needs llama.cpp's llama-perplexity and llama-quantize (a llama.cpp build's
build/bin; or $LLAMA_CPP_DIR); not a refq dependency. For the unquantized model
(--model, default SmolLM2) and each refq checkpoint --ckpt LABEL=PATH:

1. `refq export PATH --to gguf` (F32 for the dense model; Q4_0 / Q8_0 for
   symmetric 4-bit / 8-bit groups of 32, exactly);
2. llama-perplexity on the GGUF (-c CTX, -b CTX, -t THREADS);
3. `refq eval --model PATH --protocol llama.cpp --kernel dequant` (the same
   protocol in refq; dequant: numpy's BLAS on the dequantized weights, the
   fastest on a batch of 512 tokens); the row reports both perplexities and
   their relative difference.

Then llama.cpp's own Q4_0: llama-quantize --pure of the F32 export (token
embedding kept F32, as in refq's exports), its llama-perplexity, and
`refq eval` of the same rounding done by gguf-py (benchmarks/q4_0_reference.py).
Its Q4_0 blocks are compared byte for byte (gguf's GGUFReader) with gguf-py's
port of ggml's quantize_row_q4_0_ref and with each refq Q4_0 export: scales
(fp16 d) and 4-bit codes, the fraction identical.

Every step's result is kept in WORK (a rerun reuses it: delete a file to redo
that step); WORK/result.json and a markdown table on stdout at the end.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import machine  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cached(path, make):
    """The JSON in path, or make() written there first."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    r = make()
    with open(path + ".tmp", "w") as f:
        json.dump(r, f, indent=1)
    os.replace(path + ".tmp", path)
    return r


def refq_eval(model, text, ctx):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "refq.cli", "eval", "--model", model, "--text", text,
                        "--ctx", str(ctx), "--protocol", "llama.cpp", "--kernel", "dequant",
                        "--json"],
                       cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return r


def q4_0_blocks(path):
    """{tensor name: (d float16 (n_blocks,), codes uint8 (n_blocks, 32))} of the Q4_0
    tensors of a GGUF file, read with gguf's GGUFReader. A Q4_0 block is 18 bytes:
    d (fp16), then 16 bytes whose low nibbles are codes 0..15 and high nibbles
    codes 16..31 (ggml's block_q4_0); the weight is d * (code - 8)."""
    import gguf
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_0:
            continue
        b = np.asarray(t.data, np.uint8).reshape(-1, 18)
        qs = b[:, 2:]
        out[t.name] = (b[:, :2].copy().view(np.float16)[:, 0],
                       np.concatenate([qs & 15, qs >> 4], axis=1))
    return out


def compare_blocks(a, b):
    """Fractions of identical scales, codes, whole blocks over the tensors both hold."""
    names = sorted(set(a) & set(b))
    n_blocks = same_d = same_block = n_codes = same_codes = 0
    for n in names:
        (da, ca), (db, cb) = a[n], b[n]
        eq_d = da.view(np.uint16) == db.view(np.uint16)
        eq_c = ca == cb
        n_blocks += len(da)
        same_d += int(eq_d.sum())
        same_block += int((eq_d & eq_c.all(axis=1)).sum())
        n_codes += eq_c.size
        same_codes += int(eq_c.sum())
    return {"tensors": len(names), "blocks": n_blocks, "same_scale": same_d / n_blocks,
            "same_codes": same_codes / n_codes, "same_block": same_block / n_blocks}


def gguf_py_q4_0(f32_gguf):
    """gguf-py's Q4_0 (its numpy port of ggml's quantize_row_q4_0_ref) of every 2-D
    linear of an F32 GGUF, in q4_0_blocks' form."""
    import gguf
    out = {}
    for t in gguf.GGUFReader(f32_gguf).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 2 \
                and t.name.startswith("blk."):
            W = np.asarray(t.data, np.float32)
            b = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_0).reshape(-1, 18)
            qs = b[:, 2:]
            out[t.name] = (b[:, :2].copy().view(np.float16)[:, 0],
                           np.concatenate([qs & 15, qs >> 4], axis=1))
    return out


def slug(label):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")


def main():
    from refq.export import export_checkpoint
    from refq.fetch import resolve_model
    from refq.interop import llamacpp
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp-dir", default=None, help="folder of llama-perplexity and "
                    "llama-quantize (default: $LLAMA_CPP_DIR, then PATH)")
    ap.add_argument("--work", default="/tmp/refq-bench-llamacpp")
    ap.add_argument("--model", default=None, help="the unquantized HF folder (default SmolLM2)")
    ap.add_argument("--ckpt", action="append", default=[], metavar="LABEL=PATH")
    ap.add_argument("--text", default=os.path.join(REPO, "data", "eval.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prepare", action="store_true", help="only the exports (no llama.cpp "
                    "needed), to be reused by the full run")
    args = ap.parse_args()
    bins = llamacpp.find_binaries(args.llama_cpp_dir)
    if not bins and not args.prepare:
        sys.exit("llama-perplexity / llama-quantize not found (--llama-cpp-dir or $LLAMA_CPP_DIR)")
    model = resolve_model(args.model)
    text = os.path.abspath(args.text)
    os.makedirs(args.work, exist_ok=True)
    log(f"# {machine()}")
    rows = []
    sources = [("fp32 (dense) -> F32", model)] + [tuple(c.split("=", 1)) for c in args.ckpt]
    for label, src in sources:
        d = os.path.join(args.work, slug(label))
        os.makedirs(d, exist_ok=True)
        gguf_path = os.path.join(d, "gguf", "model.gguf")

        def export():
            r = export_checkpoint(src, "gguf", os.path.join(d, "gguf"))
            return {"seconds": r["seconds"], "bytes": r["bytes"],
                    "linear_types": sorted({t["type"] for t in r["tensors"]})}
        exp = cached(os.path.join(d, "export.json"), export)
        if args.prepare:
            log(f"{label}: exported {exp}")
            continue
        ll = cached(os.path.join(d, "llamacpp.json"), lambda: llamacpp.perplexity(
            bins, gguf_path, text, args.ctx, args.threads))
        rq = cached(os.path.join(d, "refq-eval.json"), lambda: refq_eval(src, text, args.ctx))
        row = {"label": label, "source": src, "gguf": gguf_path, "export": exp,
               "llamacpp": ll, "refq": rq, "rel_diff": ll["ppl"] / rq["ppl"] - 1}
        rows.append(row)
        log(json.dumps(row))

    if args.prepare:
        return
    # llama.cpp's own Q4_0 of the F32 export
    f32 = rows[0]["gguf"]
    d = os.path.join(args.work, "llama-quantize-q4_0")
    os.makedirs(d, exist_ok=True)
    q4 = os.path.join(d, "model.gguf")
    qz = cached(os.path.join(d, "quantize.json"), lambda: llamacpp.quantize(
        bins, f32, q4, "q4_0", args.threads))
    ll = cached(os.path.join(d, "llamacpp.json"), lambda: llamacpp.perplexity(
        bins, q4, text, args.ctx, args.threads))
    ref = os.path.join(args.work, "q4_0-reference")     # the same rounding by gguf-py, as HF
    if not os.path.isdir(ref):
        subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "q4_0_reference.py"),
                        ref, "--model", model], check=True)
    rq = cached(os.path.join(d, "refq-eval.json"), lambda: refq_eval(ref, text, args.ctx))
    blocks = q4_0_blocks(q4)
    same = {"gguf-py quantize_row_q4_0_ref port": compare_blocks(blocks, gguf_py_q4_0(f32))}
    for r in rows:
        if "Q4_0" in r["export"]["linear_types"]:
            same[r["label"]] = compare_blocks(blocks, q4_0_blocks(r["gguf"]))
    lq = {"label": "llama-quantize Q4_0 (--pure) of the F32 export", "quantize": qz,
          "llamacpp": ll, "refq": rq, "rel_diff": ll["ppl"] / rq["ppl"] - 1,
          "q4_0_blocks_vs": same}
    log(json.dumps(lq))
    result = {"machine": machine(), "build": llamacpp.version(bins), "text": text, "ctx": args.ctx,
              "threads": args.threads, "rows": rows, "llama_quantize": lq}
    with open(os.path.join(args.work, "result.json"), "w") as f:
        json.dump(result, f, indent=1)

    print(f"llama.cpp build: {result['build']}; {result['machine']}\n")
    print("| model | GGUF linears | llama-perplexity | refq eval --protocol llama.cpp | rel. diff |")
    print("|---|---|---:|---:|---:|")
    for r in rows + [lq]:
        kinds = ", ".join(r["export"]["linear_types"]) if "export" in r else "Q4_0"
        print(f"| {r['label']} | {kinds} | {r['llamacpp']['ppl']:.4f} ± {r['llamacpp']['ppl_err']:.4f}"
              f" | {r['refq']['ppl']:.4f} | {100 * r['rel_diff']:+.3f} % |")
    print("\nllama-quantize's Q4_0 blocks vs: fraction identical (scale d / codes / whole block)")
    for k, v in same.items():
        print(f"- {k}: {v['same_scale']:.4f} / {v['same_codes']:.4f} / {v['same_block']:.4f} "
              f"({v['blocks']:,} blocks in {v['tensors']} tensors)")


if __name__ == "__main__":
    main()
