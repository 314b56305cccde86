"""Perplexity through the integer-activation kernel ("cpu-int") vs the exact one ("cpu").

    python benchmarks/bench_kernels_int_ppl.py [--max-tokens 512] [--ctx 256] CHECKPOINT...

`refq eval` multiplies whole windows (>= 12 tokens) through dequantized tiles and
BLAS, where "cpu-int" does not apply; decoding multiplies one token at a time.
To measure what the int16 activations do to the model, this script forces EVERY
product through the small-batch kernel (the BLAS thresholds are raised for the
run), for both kernels, each checkpoint in its own process. Prints one JSON
line per (checkpoint, kernel) and the relative perplexity change.
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import refq.kernels as K
import refq.kernels.cpu as kc
K.BLAS_MIN_BATCH = 10 ** 9                      # every product through the small-batch kernel
for fn in (kc.uniform_cpu, kc.uniform_int_cpu):
    fn.blas_min_batch = lambda q: 10 ** 9
from llama_np import perplexity
from refq.cli import read_text
from refq.loading import load_for_inference
model, tok, _ = load_for_inference({model!r}, kernel={kernel!r})
ids = tok.encode(read_text({text!r}))[:{max_tokens}]
t0 = time.perf_counter()
ppl, n, _ = perplexity(model, ids, {ctx})
print(json.dumps({{"ppl": ppl, "tokens": n, "seconds": round(time.perf_counter() - t0, 1)}}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--text", default=None)
    a = p.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = a.text or os.path.join(repo, "data", "eval.txt")
    for m in a.models:
        res = {}
        for kernel in ("cpu", "cpu-int"):
            code = CHILD.format(repo=repo, model=m, kernel=kernel, text=text,
                                max_tokens=a.max_tokens, ctx=a.ctx)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                break
            res[kernel] = json.loads(r.stdout.strip().splitlines()[-1])
            print(json.dumps({"model": m, "kernel": kernel, **res[kernel]}), flush=True)
        if len(res) == 2:
            d = res["cpu-int"]["ppl"] / res["cpu"]["ppl"] - 1
            print(json.dumps({"model": m, "relative_ppl_change": d}), flush=True)


if __name__ == "__main__":
    main()
