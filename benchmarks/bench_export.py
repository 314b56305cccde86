"""Interop on SmolLM2-135M: export time and size per format, exact round trips,
and `refq eval --protocol llama.cpp` (BENCHMARKS.md, "Interop"). llama.cpp's own
perplexity of the exports: benchmarks/bench_llamacpp.py.

    python benchmarks/bench_export.py --ckpt CKPT [--label "gptq w4 g32 sym"] [--work DIR]

CKPT: a refq checkpoint of SmolLM2 made with
`refq quantize --method gptq --bits 4 --group-size 32 --sym --out CKPT`.
AQLM is timed on a checkpoint of SmolLM2's shapes with random codes (2x8,
g 8): the export does not depend on the values, and a real AQLM run takes
~40 min here. Every exported file is read back (refq's import, and gguf's
GGUFReader for GGUF) and compared bit for bit with refq's dequantized weights.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def synthetic_aqlm(model_dir, out, M=2, B=8, g=8):
    from llama_np import load_model
    from refq.checkpoint import save_packed
    from refq.formats.additive import AdditiveWeight
    model = load_model(model_dir)
    rng = np.random.default_rng(0)
    qws = {}
    for i, layer in enumerate(model.layers):
        for n, lin in layer.linears.items():
            o, k = lin.weight.shape
            qws[f"model.layers.{i}.{n}"] = AdditiveWeight.from_arrays(
                rng.integers(0, 2 ** B, (o, k // g, M)), rng.standard_normal((M, 2 ** B, g)) * 0.05,
                rng.uniform(0.5, 2, o), B,
                options={"num_codebooks": M, "nbits_per_codebook": B, "in_group_size": g})
    save_packed(out, model_dir, model, qws, {"method": "aqlm", "options": {"synthetic": True}})


def check_exact(src, exported, kind):
    """Largest |difference| between refq's dequantized weights and the exported file's."""
    from refq.checkpoint import load_packed
    _, _, _, ref = load_packed(src)
    if kind == "gguf":
        import gguf

        from llama_np.gguf_import import hf_name, unpermute
        cfg = json.load(open(os.path.join(src, "config.json")))
        r = gguf.GGUFReader(os.path.join(exported, "model.gguf"))
        got = {}
        for t in r.tensors:
            name = hf_name(t.name)[:-len(".weight")]
            if name in ref:
                W = gguf.quants.dequantize(t.data, t.tensor_type)
                if name.endswith("q_proj"):
                    W = unpermute(W, cfg["num_attention_heads"])
                elif name.endswith("k_proj"):
                    W = unpermute(W, cfg["num_key_value_heads"])
                got[name] = W
    else:
        _, _, _, imp = load_packed(exported)
        got = {n: q.dequantize() for n, q in imp.items()}
    assert sorted(got) == sorted(ref)
    return max(float(np.abs(got[n] - ref[n].dequantize()).max()) for n in ref)


def refq_cli(*args):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "refq.cli", *args], cwd=REPO, capture_output=True,
                       text=True)
    if p.returncode:
        sys.exit(p.stderr)
    return json.loads(p.stdout), time.perf_counter() - t0


def main():
    from refq.export import export_checkpoint
    from refq.fetch import resolve_model
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True, help="refq uniform checkpoint (sym 4-bit, g 32)")
    ap.add_argument("--label", default="gptq w4 g32 sym")
    ap.add_argument("--work", default="/tmp/refq-bench-export")
    ap.add_argument("--text", default=os.path.join(REPO, "data", "eval.txt"))
    ap.add_argument("--skip-refq-eval", action="store_true")
    args = ap.parse_args()
    model = resolve_model(None)
    os.makedirs(args.work, exist_ok=True)
    aq = os.path.join(args.work, "aqlm-synthetic")
    if not os.path.isdir(aq):
        synthetic_aqlm(model, aq)
    rows = []
    print(f"# {platform.processor() or platform.machine()}, load {os.getloadavg()}", file=sys.stderr)
    for src, to, label in ((args.ckpt, "gptq", args.label),
                           (args.ckpt, "gguf", args.label),
                           (aq, "aqlm", "aqlm 2x8 g8 (random codes)"),
                           (model, "gguf", "SmolLM2 fp32 (dense)")):
        out = os.path.join(args.work, f"{os.path.basename(src)}-{to}")
        if os.path.exists(out):
            import shutil
            shutil.rmtree(out)
        r = export_checkpoint(src, to, out)
        src_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        err = check_exact(src, out, to) if src != model else 0.0
        kinds = sorted({t["type"] for t in r["tensors"]})
        row = {"source": label, "to": to, "seconds": r["seconds"], "bytes": r["bytes"],
               "source_bytes": src_bytes, "linear_types": kinds, "max_abs_diff": err, "out": out}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"export": rows, "load": os.getloadavg()}
    if not args.skip_refq_eval:
        r, secs = refq_cli("eval", "--model", args.ckpt, "--reference", model, "--text", args.text,
                           "--protocol", "llama.cpp", "--json")
        r["wall_seconds"] = round(secs, 1)
        result["refq_eval"] = r
        print(json.dumps(r), flush=True)
    with open(os.path.join(args.work, "result.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
