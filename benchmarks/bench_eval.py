"""Perplexity speed (issue #19): `refq eval` of this tree and, side by side, of
another tree (the old code), on the same models, alternating.

    git -C . archive b9ca3dd | (mkdir -p /tmp/old && tar -x -C /tmp/old)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_eval.py \\
        --old /tmp/old --model default --model smollm2-gptq-w3g128 [--tokens N] [--reps 2]

Each run is a fresh process doing what `refq eval --model M` does (load,
tokenize data/eval.txt, perplexity with ctx 512) on the code of the tree (its
working directory and PYTHONPATH); a first short run per tree and model
compiles and caches the numba kernels and is not counted.  Prints one JSON
line per run (tree, model, wall and CPU seconds of the perplexity itself, the
CPU seconds summed over its threads; ppl, peak RSS of the process, load
average) and a summary: per model, the best of each tree and the ratios
old / new.  On a shared machine only ratios of runs made side by side mean
anything, and the CPU seconds (the work done) depend less on the load than
the wall time.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CHILD = """
import json, resource, sys, time
from llama_np import perplexity
from refq.loading import load_for_inference
model, tok, _ = load_for_inference(None if sys.argv[1] == "default" else sys.argv[1])
with open("data/eval.txt", encoding="utf-8") as f:
    ids = tok.encode(f.read())
if sys.argv[2] != "all":
    ids = ids[:int(sys.argv[2])]
if len(sys.argv) > 3:                  # --batch-tokens: windows per product of the new code
    sys.modules["llama_np.generate"].BATCH_TOKENS = int(sys.argv[3])
w, c = time.perf_counter(), time.process_time()
ppl, n, _ = perplexity(model, ids, 512)
print(json.dumps({"seconds": round(time.perf_counter() - w, 2),
                  "cpu_seconds": round(time.process_time() - c, 2), "ppl": ppl, "tokens": n,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def run_eval(tree, model, tokens, batch_tokens=None):
    """`refq eval`'s perplexity (the same calls: load_for_inference, Tokenizer.encode,
    perplexity with ctx 512) in a fresh process on the code of `tree`: wall and CPU
    seconds (all threads) of the perplexity itself."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["PYTHONPATH"] = tree
    args = [model, str(tokens or "all")] + ([str(batch_tokens)] if batch_tokens else [])
    p = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=tree,
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{tree}: eval of {model} failed:\n{p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(res, load=round(os.getloadavg()[0], 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None, help="another source tree, run side by side")
    ap.add_argument("--model", action="append", default=None,
                    help="model folder or packed checkpoint ('default': the fetched SmolLM2); "
                         "repeatable")
    ap.add_argument("--tokens", type=int, default=None, help="the first N tokens of eval.txt (default: all)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch-tokens", default=None,
                    help="e.g. 512,1024,2048: compare these llama_np.generate.BATCH_TOKENS "
                         "of this tree instead of two trees")
    a = ap.parse_args()
    if a.batch_tokens:
        return compare_batches(a)
    from refq.machine import cpu_model
    trees = {"new": REPO} if a.old is None else {"new": REPO, "old": os.path.abspath(a.old)}
    models = a.model or ["default"]
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(),
                      "load": os.getloadavg()}), flush=True)
    for tree in trees.values():                      # numba compilation, cached; not counted
        for m in models:
            run_eval(tree, m, 64)
    runs = {}
    for rep in range(a.reps):
        for m in models:
            for name, tree in (trees.items() if rep % 2 == 0 else reversed(trees.items())):
                r = run_eval(tree, m, a.tokens)
                print(json.dumps(dict(tree=name, model=m, rep=rep, **r)), flush=True)
                runs.setdefault((m, name), []).append(r)
    for m in models:
        best = {(n, k): min(r[k] for r in runs[(m, n)]) for n in trees
                for k in ("seconds", "cpu_seconds")}
        row = {"model": m, **{f"{n}_{k}": v for (n, k), v in best.items()},
               **{f"{n}_ppl": runs[(m, n)][0]["ppl"] for n in trees}}
        if "old" in trees:
            for k in ("seconds", "cpu_seconds"):
                row[f"old_over_new_{k}"] = round(best[("old", k)] / best[("new", k)], 2)
        print(json.dumps(row), flush=True)



def compare_batches(a):
    """This tree's perplexity with each BATCH_TOKENS of --batch-tokens, alternating."""
    sizes = [int(v) for v in a.batch_tokens.split(",")]
    for m in a.model or ["default"]:
        run_eval(REPO, m, 64)
        for rep in range(a.reps):
            for bt in sizes:
                r = run_eval(REPO, m, a.tokens, bt)
                print(json.dumps(dict(model=m, batch_tokens=bt, rep=rep, **r)), flush=True)


if __name__ == "__main__":
    main()
