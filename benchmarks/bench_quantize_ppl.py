"""SmolLM2 perplexity after quantization, per method and configuration (BENCHMARKS.md).

    python benchmarks/bench_quantize_ppl.py [--methods rtn,gptq,claq] [--configs LABEL,...]
        [--nsamples 32] [--seqlen 512] [--out-dir /tmp/refq-bench] [--no-fp32]

For each configuration: `refq quantize ... --json` (packed checkpoint written to
disk), then `refq eval --model CHECKPOINT --json` on data/eval.txt, so the
numbers are those of the saved checkpoint. Prints a markdown table.
"""
import argparse
import json
import os
import platform
import subprocess
import sys

UNIFORM = [  # (label, flags)
    ("w4 per-channel", ["--bits", "4", "--group-size", "none"]),
    ("w4 g128", ["--bits", "4", "--group-size", "128"]),
    ("w3 per-channel", ["--bits", "3", "--group-size", "none"]),
    ("w3 g128", ["--bits", "3", "--group-size", "128"]),
    ("w2 g64", ["--bits", "2", "--group-size", "64"]),
]
OR = ["--outlier-reservation"]
CONFIGS = {  # method -> [(label, flags)]
    "rtn": UNIFORM,
    "gptq": [(label, flags + ["--act-order"]) for label, flags in UNIFORM],
    "claq": [("3.0", ["--bits", "3"]), ("2.2 AP + OR", ["--bits", "2.2"] + OR),
             ("4.0", ["--bits", "4"]), ("2.5 AP", ["--bits", "2.5"]),
             ("3.0 + OR", ["--bits", "3"] + OR), ("2.1 AP", ["--bits", "2.1"]),
             ("3.1 AP", ["--bits", "3.1"]), ("2.2 AP", ["--bits", "2.2"]),
             ("2.1 AP + OR", ["--bits", "2.1"] + OR), ("2.0", ["--bits", "2"])],
}


def run_json(args):
    r = subprocess.run([sys.executable, "-m", "refq.cli"] + args, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", default="32")
    ap.add_argument("--rtn-nsamples", default="4",
                    help="RTN ignores H; calibration only feeds the per-layer loss column")
    ap.add_argument("--seqlen", default="512")
    ap.add_argument("--out-dir", default="/tmp/refq-bench")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--configs", default="", help="only these labels (comma-separated)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 baseline eval")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    rows = []
    base = {"ppl": 43.7322} if a.no_fp32 else run_json(["eval", "--json"])   # measured, issue #2
    rows.append(("fp32", "-", 32.0, base["ppl"], 0.0))
    print(f"fp32: ppl {base['ppl']:.4f}", file=sys.stderr, flush=True)
    for method in a.methods.split(","):
        for label, flags in CONFIGS[method]:
            if a.configs and label not in a.configs.split(","):
                continue
            extra = []
            out = os.path.join(a.out_dir, f"{method}-{label.replace(' ', '-')}")
            ns = a.rtn_nsamples if method == "rtn" else a.nsamples
            q = run_json(["quantize", "--method", method, *flags, *extra, "--nsamples", ns,
                          "--seqlen", a.seqlen, "--out", out, "--force", "--json"])
            e = run_json(["eval", "--model", out, "--json"])
            rows.append((method + (" act_order" if "--act-order" in flags else ""), label, q["bits_per_weight"],
                         e["ppl"], q["seconds"]))
            print(rows[-1], file=sys.stderr, flush=True)
            print(f"| {rows[-1][0]} | {label} | {rows[-1][2]:.4f} | {rows[-1][3]:.3f} | "
                  f"{rows[-1][3] / base['ppl']:.4f} | {rows[-1][4]:.0f} |", file=sys.stderr, flush=True)
    print(f"Command: `python benchmarks/bench_quantize_ppl.py --nsamples {a.nsamples} "
          f"--rtn-nsamples {a.rtn_nsamples} --seqlen {a.seqlen}`; machine: {platform.machine()}, {os.cpu_count()} cores.\n")
    print(f"| method | config | bits/weight | ppl (eval.txt, ctx 512) | ppl / fp32 | quantize s |")
    print("|---|---|---|---|---|---|")
    for m, c, bpw, ppl, secs in rows:
        print(f"| {m} | {c} | {bpw:.4f} | {ppl:.3f} | {ppl / base['ppl']:.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
