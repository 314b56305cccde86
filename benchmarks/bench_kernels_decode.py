"""End-to-end decode speed and memory: fp32 HF model vs packed checkpoints.

    PYTHONPATH=. python benchmarks/bench_kernels_decode.py [--tokens 64] [--kernel cpu] MODEL...

Each MODEL (an HF folder, a refq packed checkpoint, or "fp32" for the fetched
SmolLM2) runs in its own subprocess: load, a 16-token prompt, then --tokens
greedy tokens through the KV cache (one token per forward, i.e. batch-1
matmuls: the case the LUT/unpack kernels are for). Printed per model:
decode tokens/s (after the first 4 tokens, which include numba compilation)
and the peak resident memory of the process (ru_maxrss).
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from refq.loading import load_for_inference
model, tok, folder = load_for_inference({model!r}, kernel={kernel!r})
prompt = tok.encode("The Jargon File is a glossary of hacker slang. It")[:16]
cache = model.new_cache(len(prompt) + {tokens} + 1)
logits = model.forward(np.array(prompt), cache)
t0 = None
for i in range({tokens}):
    if i == 4:
        t0 = time.perf_counter()
    nxt = int(np.argmax(logits[-1]))
    logits = model.forward(np.array([nxt]), cache)
dt = time.perf_counter() - t0
print(json.dumps({{"model": {model!r}, "kernel": {kernel!r}, "tokens_per_s": ({tokens} - 4) / dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--kernel", default="cpu")
    a = p.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for m in a.models:
        model = None if m == "fp32" else m
        code = CHILD.format(repo=repo, model=model, kernel=a.kernel, tokens=a.tokens)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["model"] = m
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
