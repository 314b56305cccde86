"""SmolLM2 perplexity after RTN and GPTQ at several bit widths (BENCHMARKS.md).

    python benchmarks/bench_quantize_ppl.py [--nsamples 32] [--seqlen 512] [--out-dir /tmp/refq-bench]

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

CONFIGS = [  # (label, flags)
    ("w4 per-channel", ["--bits", "4", "--group-size", "none"]),
    ("w4 g128", ["--bits", "4", "--group-size", "128"]),
    ("w3 per-channel", ["--bits", "3", "--group-size", "none"]),
    ("w3 g128", ["--bits", "3", "--group-size", "128"]),
    ("w2 g64", ["--bits", "2", "--group-size", "64"]),
]


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
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    rows = []
    base = run_json(["eval", "--json"])
    rows.append(("fp32", "-", 32.0, base["ppl"], 0.0))
    print(f"fp32: ppl {base['ppl']:.4f}", file=sys.stderr, flush=True)
    for method in a.methods.split(","):
        for label, flags in CONFIGS:
            extra = ["--act-order"] if method == "gptq" else []
            out = os.path.join(a.out_dir, f"{method}-{label.replace(' ', '-')}")
            ns = a.rtn_nsamples if method == "rtn" else a.nsamples
            q = run_json(["quantize", "--method", method, *flags, *extra, "--nsamples", ns,
                          "--seqlen", a.seqlen, "--out", out, "--force", "--json"])
            e = run_json(["eval", "--model", out, "--json"])
            rows.append((method + (" act_order" if extra else ""), label, q["bits_per_weight"],
                         e["ppl"], q["seconds"]))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"Command: `python benchmarks/bench_quantize_ppl.py --nsamples {a.nsamples} "
          f"--rtn-nsamples {a.rtn_nsamples} --seqlen {a.seqlen}`; machine: {platform.machine()}, {os.cpu_count()} cores.\n")
    print(f"| method | config | bits/weight | ppl (eval.txt, ctx 512) | ppl / fp32 | quantize s |")
    print("|---|---|---|---|---|---|")
    for m, c, bpw, ppl, secs in rows:
        print(f"| {m} | {c} | {bpw:.4f} | {ppl:.3f} | {ppl / base['ppl']:.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
