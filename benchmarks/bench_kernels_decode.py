"""End-to-end decode speed and memory: fp32 HF model vs packed checkpoints, interleaved.

    PYTHONPATH=. python benchmarks/bench_kernels_decode.py [--tokens 32] [--rounds 5]
        [--kernel cpu] [--no-fuse] [--breakdown] [--profile] [--base-repo DIR] MODEL...

Each MODEL (an HF folder, a refq packed checkpoint, or "fp32" for the fetched
SmolLM2; PATH@nofuse: that model with fusion off, next to the others) is loaded
once in its own worker process. A round asks each worker in turn (the others
wait, idle) to run a 16-token prompt, then --tokens greedy tokens through the KV
cache (one token per forward, i.e. batch-1 matmuls: the case the kernels are
for), and to report the decode seconds (prompt excluded). A first round compiles
numba's kernels and is not counted. Models are thus timed alternately, under the
same load, as the GEMV benchmarks time a kernel and numpy's fp32 GEMV side by side.

Printed per model: decode tokens/s of its best round, the median over rounds of
its speed-up over the first model (rounds are seconds apart, so a change of load
hits both), the prompt's time (its best round: one forward of 16 tokens, the
BLAS path of the kernels), how many greedy tokens equal the first model's, and the peak
resident memory of its process (ru_maxrss).

--no-fuse      q/k/v and gate/up one product each (DecoderLayer.fuse off) for all
--base-repo D  every model also runs on another checkout's code, as MODEL@base
               (before/after in the same rounds; its speed-ups are over the first
               model on that code; a checkout without DecoderLayer.fuse ignores it)
--breakdown    every round also splits its ms per token into: inside the numba
               kernels (cpu._run: the compiled calls alone), dense GEMVs
               (Linear.matmul but lm_head), the head (final norm + lm_head), and the
               rest (llama_np's layer code, the Python around each kernel); printed
               for the best round (the counters cost ~0.1 us per product)
--profile      the cProfile of one more round per model (most own time first)
"""
import argparse
import json
import os
import statistics
import sys

WORKER = r"""
import cProfile, io, json, pstats, resource, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from refq.loading import load_for_inference
model, tok, folder = load_for_inference({model!r}, kernel={kernel!r})
for layer in model.layers:
    layer.fuse = {fuse!r}
prompt = np.array(tok.encode("The Jargon File is a glossary of hacker slang. It")[:16])

def decode(n, at_start=dict):
    global prompt_s
    cache = model.new_cache(len(prompt) + n + 1)
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    prompt_s = time.perf_counter() - t0
    ids = []
    at_start()
    t0 = time.perf_counter()
    for i in range(n):
        ids.append(int(np.argmax(logits[-1])))
        logits = model.forward(np.array(ids[-1:]), cache)
    return time.perf_counter() - t0, ids

def breakdown(n):
    # ms per token inside the numba kernels (cpu._run: the compiled call alone), inside
    # dense GEMVs (Linear.matmul, lm_head excluded), in the head (final norm + lm_head),
    # and the rest (llama_np's layer code and the Python around each kernel)
    import llama_np.model as lm
    kc = sys.modules.get("refq.kernels.cpu")   # not imported by a dense model (numba: ~45 MB)
    acc = {{"kernels": 0.0, "dense_linears": 0.0, "head": 0.0}}
    def timed(key, f):
        def g(*args):
            t = time.perf_counter()
            r = f(*args)
            acc[key] += time.perf_counter() - t
            return r
        return g
    lin0, head0 = lm.Linear.matmul, model.head
    dense = timed("dense_linears", lin0)
    if kc is not None:
        run0 = kc._run
        kc._run = timed("kernels", run0)
    lm.Linear.matmul = lambda self, x: lin0(self, x) if self is model.lm_head else dense(self, x)
    model.head = timed("head", head0)
    try:
        dt, ids = decode(n, lambda: acc.update(dict.fromkeys(acc, 0.0)))    # the prompt not counted
    finally:
        lm.Linear.matmul = lin0
        if kc is not None:
            kc._run = run0
        del model.head
    ms = {{k: round(v / n * 1e3, 3) for k, v in acc.items()}}
    ms["total"] = round(dt / n * 1e3, 3)
    ms["rest"] = round(ms["total"] - sum(acc.values()) / n * 1e3, 3)
    return dt, ids, ms

for line in sys.stdin:
    cmd, n = line.split()
    if cmd == "run":
        dt, ids = decode(int(n))
        out = {{"seconds": dt, "ids": ids, "prompt_seconds": prompt_s}}
    elif cmd == "profile":
        pr = cProfile.Profile()
        pr.enable()
        dt, ids = decode(int(n))
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
        out = {{"seconds": dt, "profile": s.getvalue()}}
    elif cmd == "breakdown":
        dt, ids, ms = breakdown(int(n))
        out = {{"seconds": dt, "ids": ids, "ms_per_token": ms, "prompt_seconds": prompt_s}}
    else:
        out = {{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
    print(json.dumps(out), flush=True)
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kernel", default="cpu")
    p.add_argument("--no-fuse", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--base-repo", default=None,
                   help="another refq checkout (e.g. `git archive main` unpacked): every "
                        "model also runs on its code, as MODEL@base, in the same rounds")
    a = p.parse_args()
    sys.path.insert(0, REPO)
    from benchmarks.harness import Worker, machine

    runs = [(m, REPO) for m in a.models]
    if a.base_repo:
        runs += [(m + "@base", os.path.abspath(a.base_repo)) for m in a.models]
    workers = []
    for m, repo in runs:
        path = m.removesuffix("@base").removesuffix("@nofuse")
        code = WORKER.format(repo=repo, model=None if path == "fp32" else path, kernel=a.kernel,
                             fuse=not (a.no_fuse or "@nofuse" in m))
        workers.append(Worker([sys.executable, "-c", code]))
    a.models = [m for m, _ in runs]
    print(f"# {machine()}; {a.tokens} tokens after a 16-token prompt, kernel {a.kernel}, "
          f"fuse {'off' if a.no_fuse else 'on'}, {a.rounds} rounds", flush=True)
    cmd = "breakdown" if a.breakdown else "run"
    for w in workers:
        w(f"run {a.tokens}")                                  # warm-up: numba compilation
    res = [[] for _ in workers]
    for _ in range(a.rounds):
        for i, w in enumerate(workers):
            res[i].append(w(f"{cmd} {a.tokens}"))
    for i, (m, w, rs) in enumerate(zip(a.models, workers, res)):
        ref = len(runs) // 2 if m.endswith("@base") else 0     # fp32 of the same code, if first
        secs = [r["seconds"] for r in rs]
        best = min(range(len(rs)), key=lambda k: secs[k])
        out = {"model": m, "kernel": a.kernel, "tokens_per_s": a.tokens / secs[best],
               "tokens_per_s_rounds": [round(a.tokens / x, 2) for x in secs],
               f"speedup_vs_{a.models[ref]}_median": statistics.median(
                   r0["seconds"] / r["seconds"] for r0, r in zip(res[ref], rs)),
               "prompt_ms_min": round(min(r["prompt_seconds"] for r in rs) * 1e3, 1),
               "same_tokens_as_first": sum(x == y for x, y in zip(rs[-1]["ids"], res[ref][-1]["ids"])),
               "peak_rss_mb": w("rss 0")["peak_rss_mb"]}
        if a.breakdown:
            out["ms_per_token_best_round"] = rs[best]["ms_per_token"]
        print(json.dumps(out), flush=True)
    if a.profile:
        for m, w in zip(a.models, workers):
            print(f"## profile of {m}\n" + w(f"profile {a.tokens}")["profile"], flush=True)
    for w in workers:
        w.close()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    main()
