"""refq's CLAQ vs the official CLAQ code (fayuge/CLAQ) on real SmolLM2 layers.

This is a benchmark, not a test. The official code is NOT part of refq: export
it yourself (e.g. `git clone https://github.com/fayuge/CLAQ /tmp/claq`) and
pass its folder with --official-dir; this script only imports its claq.py /
quant.py from there, in a worker process under a Python with torch, sklearn
and yaml (--torch-python).

    python benchmarks/bench_claq_official.py --official-dir /tmp/claq \
        [--torch-python /tmp/tfenv/bin/python] [--cache /tmp/refq-layers]

1. (W, H) of real layers: the cache of bench_gptq_official.py (same options,
   same file CACHE/hessians.npz; built if missing).
2. k-means: for --kmeans-columns columns of each layer, refq.methods.kmeans1d
   (exact DP) vs sklearn KMeans(n_clusters=2^b, random_state=10, n_init="auto")
   as the official kmclustering() calls it; total time and total cost.
3. Whole layers: official CLAQ.fasterquant(bit, ..., actorder=True) with
   gptq.H = 2 H (the official 2/n scaling; float32) vs
   refq.quantize_weight(W, H, "claq", ...), same options, alternating,
   --repeats times each (min time).  Both Q scored with refq.layer_loss in
   float64.  torch.cuda.synchronize (called by fasterquant) is replaced by a
   no-op for the CPU-only torch.
"""

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from harness import (OfficialWorker, add_calibration_arguments, full_names, gmean, key,  # noqa: E402
                     layers_npz, machine)

# label -> (refq options, official fasterquant arguments)
CONFIGS = {
    "w2": (dict(bits=2), dict(bit=2)),
    "w3": (dict(bits=3), dict(bit=3)),
    "w4": (dict(bits=4), dict(bit=4)),
    "AP 2.2": (dict(bits=2.2), dict(bit=2, outlierorder=2.2)),
    "w2 + OR": (dict(bits=2, outlier_reservation=True, or_fit="before"),
                dict(bit=2, outlier_col_dynamic=True)),
    "AP 2.05 + OR": (dict(bits=2.05, outlier_reservation=True, or_fit="before"),
                     dict(bit=2, outlierorder=2.05, outlier_col_dynamic=True)),
}


# ---------------------------------------------------------------------------
# official side (worker under a Python with torch)
# ---------------------------------------------------------------------------
def run_official(a):
    import torch
    import torch.nn as nn
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.abspath(a.official_dir))
    reply = sys.stdout
    sys.stdout = sys.stderr
    with contextlib.redirect_stdout(io.StringIO()):
        import claq as off_claq
    from sklearn.cluster import KMeans
    torch.cuda.synchronize = lambda *args, **kw: None
    data = np.load(os.path.join(a.cache, "hessians.npz"))
    logdir = tempfile.mkdtemp(prefix="claq-log-")
    results = {}
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "SAVE":
            results["torch"] = np.array(torch.__version__)
            np.savez(os.path.join(a.cache, "claq_official.npz"), **results)
            print(json.dumps({"ok": True}), file=reply, flush=True)
            continue
        if cmd == "KMEANS":                                  # KMEANS name|bits|ncols
            name, bits, ncols = arg.split("|")
            W = data["W_" + key(name)]
            cols = W[:, :int(ncols)].astype(np.float64)
            t0 = time.perf_counter()
            cost = 0.0
            for j in range(cols.shape[1]):
                km = KMeans(n_clusters=2 ** int(bits), random_state=10, n_init="auto")
                km.fit(cols[:, j].reshape(-1, 1))
                cost += float(km.inertia_)
            print(json.dumps({"seconds": time.perf_counter() - t0, "cost": cost}), file=reply,
                  flush=True)
            continue
        name, label = arg.split("|")
        kw = dict(bit=2, outlier=0, outlier_col_dynamic=False, outlierorder=0)
        kw.update(CONFIGS[label][1])
        W = data["W_" + key(name)]
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = torch.from_numpy(W.copy())
        q = off_claq.CLAQ(layer)
        q.H = torch.from_numpy((2.0 * data["H_" + key(name)]).astype(np.float32))
        q.nsamples = a.nsamples * a.seqlen
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            q.fasterquant(kw["bit"], logdir, "None", name, kw["outlier"],
                          kw["outlier_col_dynamic"], False, kw["outlierorder"], 0,
                          blocksize=128, percdamp=0.01, groupsize=-1, actorder=True)
            t = time.perf_counter() - t0
        results[f"Q|{name}|{label}"] = layer.weight.data.numpy().copy()
        print(json.dumps({"seconds": t}), file=reply, flush=True)


# ---------------------------------------------------------------------------
# refq side
# ---------------------------------------------------------------------------
def main_mode(a):
    sys.path.insert(0, REPO)
    from refq.api import layer_loss, quantize_weight
    from refq.methods.kmeans1d import kmeans1d_centroids, kmeans_cost, nearest_centroid

    names = full_names(a)
    hpath = os.path.join(a.cache, "hessians.npz")
    os.makedirs(a.cache, exist_ok=True)
    data = layers_npz(a, names, hpath)
    if a.subset:
        names = [n for n in names if n in a.subset.split(",")]
    official = OfficialWorker(a.torch_python, __file__, [
        "--official-dir", a.official_dir,
        "--cache", a.cache, "--threads", str(a.threads),
        "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)])

    rng = np.random.default_rng(0)                          # numba warm-up outside the timings
    Xw = rng.standard_normal((512, 256))
    quantize_weight(rng.standard_normal((64, 256)).astype(np.float32), Xw.T @ Xw / 512, "claq",
                    bits=2.05, outlier_reservation=True)

    # 1. k-means alone
    km_rows = []
    for name in names[:: max(1, len(names) // 4)]:
        W = data["W_" + key(name)].astype(np.float64)
        for bits in (2, 4):
            off = official(f"KMEANS {name}|{bits}|{a.kmeans_columns}")
            kmeans1d_centroids(W[:, 0], 2 ** bits)          # compiled outside the timing
            t0 = time.perf_counter()
            cents = [kmeans1d_centroids(W[:, j], 2 ** bits) for j in range(a.kmeans_columns)]
            t = time.perf_counter() - t0
            cost = sum(kmeans_cost(W[:, j], c, nearest_centroid(W[:, j], c))
                       for j, c in enumerate(cents))
            km_rows.append((name, bits, t, off["seconds"], cost, off["cost"]))
            print(f"kmeans {name} {bits}b: refq {t:.3f} s, sklearn {off['seconds']:.3f} s",
                  file=sys.stderr, flush=True)

    # 2. whole layers
    rows = []
    if a.only_kmeans:
        names = []
    for name in names:
        W, H = data["W_" + key(name)], data["H_" + key(name)]
        for label, (opts, _) in CONFIGS.items():
            if label not in a.configs.split(","):
                continue
            t_r, t_o = math.inf, math.inf
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                qw = quantize_weight(W, H, "claq", name=name, **opts)
                t_r = min(t_r, time.perf_counter() - t0)
                t_o = min(t_o, official(f"RUN {name}|{label}")["seconds"])
            qa = None
            if opts.get("or_fit") == "before":             # refq's default fit, for the record
                qa = quantize_weight(W, H, "claq", name=name, **dict(opts, or_fit="after"))
            rows.append([name, label, layer_loss(W, qw.dequantize(), H), None, t_r, t_o,
                         qw.bits_per_weight, None if qa is None else layer_loss(W, qa.dequantize(), H)])
            print(f"{name} {label}: refq {t_r:.2f} s, official {t_o:.2f} s", file=sys.stderr,
                  flush=True)
    official("SAVE")
    official.close()
    off = np.load(os.path.join(a.cache, "claq_official.npz"))
    for r in rows:
        r[3] = layer_loss(data["W_" + key(r[0])], off[f"Q|{r[0]}|{r[1]}"], data["H_" + key(r[0])])

    print(f"\n### k-means: refq exact DP vs sklearn KMeans (random_state 10, n_init auto), "
          f"first {a.kmeans_columns} columns of each layer\n")
    print("| layer | bits | time refq s | time sklearn s | speed-up | cost refq / sklearn |")
    print("|---|---|---|---|---|---|")
    for name, bits, t, to, c, co in km_rows:
        print(f"| {name} | {bits} | {t:.3f} | {to:.3f} | {to / t:.0f}x | {c / co:.4f} |")
    print(f"| **all** | | {sum(r[2] for r in km_rows):.3f} | {sum(r[3] for r in km_rows):.3f} | "
          f"{sum(r[3] for r in km_rows) / sum(r[2] for r in km_rows):.0f}x | "
          f"{gmean([r[4] / r[5] for r in km_rows]):.4f} (geomean) |")

    if rows:
        print(f"\n### Whole layers: refq CLAQ vs official `CLAQ.fasterquant` (act_order, percdamp 0.01, "
              f"blocksize 128); H = mean x xᵀ of {a.nsamples} x {a.seqlen} tokens of calib.txt, dense "
              f"model; loss = tr((W-Q) H (W-Q)ᵀ) in float64; times min of {a.repeats}, alternating; "
              f"official: torch {off['torch']} CPU, {a.threads} threads.  OR rows use or_fit=before "
              f"(the official choice); the last column is refq's default or_fit=after.\n")
        print("| layer | config | refq bpw | loss refq | loss official | ratio | time refq s "
              "| time official s | ratio | loss refq or_fit=after / official |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, label, lr, lo, tr, to, bpw, la in rows:
            extra = "" if la is None else f"{la / lo:.4f}"
            print(f"| {name} | {label} | {bpw:.3f} | {lr:.5g} | {lo:.5g} | {lr / lo:.4f} | {tr:.2f} "
                  f"| {to:.2f} | {tr / to:.3f} | {extra} |")
        for label in [c for c in CONFIGS if c in a.configs.split(",")] + [None]:
            sel = [r for r in rows if label is None or r[1] == label]
            print(f"| **{'all' if label is None else label}** ({len(sel)}) | geomean / sums | | | | "
                  f"{gmean([r[2] / r[3] for r in sel]):.4f} | {sum(r[4] for r in sel):.1f} | "
                  f"{sum(r[5] for r in sel):.1f} | {gmean([r[4] / r[5] for r in sel]):.3f} | |")
    print(f"\nCommand: `python benchmarks/bench_claq_official.py --official-dir OFFICIAL --layers "
          f"{a.layers} --linears {a.linears} --configs '{a.configs}' --subset '{a.subset}' --repeats {a.repeats}`")
    print(f"Machine: {machine()}; numpy {np.__version__}.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-dir", required=True)
    ap.add_argument("--torch-python", default="/tmp/tfenv/bin/python")
    ap.add_argument("--cache", default="/tmp/refq-layers")
    add_calibration_arguments(ap)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--subset", default="", help="only these layers of the cache, e.g. 0.self_attn.q_proj")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kmeans-columns", type=int, default=64)
    ap.add_argument("--only-kmeans", action="store_true", help="skip the whole-layer comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-official", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run_official:
        run_official(a)
    else:
        main_mode(a)


if __name__ == "__main__":
    main()
