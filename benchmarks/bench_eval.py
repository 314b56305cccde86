"""Perplexity speed (issue #19): `refq eval` of this tree and, side by side, of
another tree (the old code), on the same models, alternating.

    git -C . archive b9ca3dd | (mkdir -p /tmp/old && tar -x -C /tmp/old)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_eval.py \\
        --old /tmp/old --model default --model smollm2-gptq-w3g128 [--tokens N] [--reps 2]

Each run is a fresh process, `python -m refq.cli eval --model M --json` with
the tree as working directory and PYTHONPATH (a first short run per tree and
model compiles and caches the numba kernels and is not counted).  Prints one
JSON line per run (tree, model, seconds of the perplexity itself as `refq eval`
reports them, wall seconds of the process, ppl, load average) and a summary:
per model, the best seconds of each tree and their ratio.  On a shared
machine only ratios of runs made side by side mean anything.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_eval(tree, model, tokens):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["PYTHONPATH"] = tree
    cmd = [sys.executable, "-m", "refq.cli", "eval", "--json"]
    if model != "default":
        cmd += ["--model", model]
    if tokens:
        cmd += ["--max-tokens", str(tokens)]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return {"seconds": res["seconds"], "wall": round(wall, 2), "ppl": res["ppl"],
            "tokens": res["tokens"], "load": round(os.getloadavg()[0], 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None, help="another source tree, run side by side")
    ap.add_argument("--model", action="append", default=None,
                    help="model folder or packed checkpoint ('default': the fetched SmolLM2); "
                         "repeatable")
    ap.add_argument("--tokens", type=int, default=None, help="--max-tokens (default: all)")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    from refq.machine import cpu_model
    trees = {"new": REPO} if a.old is None else {"new": REPO, "old": os.path.abspath(a.old)}
    models = a.model or ["default"]
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(),
                      "load": os.getloadavg()}), flush=True)
    for tree in trees.values():                      # numba compilation, cached; not counted
        for m in models:
            run_eval(tree, m, 64)
    best = {}
    for rep in range(a.reps):
        for m in models:
            for name, tree in (trees.items() if rep % 2 == 0 else reversed(trees.items())):
                r = run_eval(tree, m, a.tokens)
                print(json.dumps(dict(tree=name, model=m, rep=rep, **r)), flush=True)
                b = best.setdefault((m, name), r)
                if r["seconds"] < b["seconds"]:
                    best[(m, name)] = r
    for m in models:
        row = {"model": m, **{f"{n}_s": best[(m, n)]["seconds"] for n in trees},
               **{f"{n}_ppl": best[(m, n)]["ppl"] for n in trees}}
        if "old" in trees:
            row["old_over_new"] = round(best[(m, "old")]["seconds"] / best[(m, "new")]["seconds"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
