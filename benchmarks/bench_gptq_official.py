"""refq's GPTQ vs the official GPTQ code (IST-DASLab/gptq) on real SmolLM2 layers.

This is a benchmark, not a test. The official code is NOT part of refq: fetch
it yourself (e.g. `git clone https://github.com/IST-DASLab/gptq /tmp/gptq`)
and pass its folder with --official-dir; this script only imports its
gptq.py / quant.py from there.

    python benchmarks/bench_gptq_official.py --official-dir /tmp/gptq \
        [--torch-python /tmp/tfenv/bin/python] [--cache /tmp/refq-gptq-official]

Steps (main mode, refq's Python, no torch needed):
 1. (W, H) of the chosen linears of SmolLM2-135M, H = mean x xᵀ from a DENSE
    layer-by-layer pass over --nsamples x --seqlen tokens of data/calib.txt
    (refq.calibrate.calibration_windows / capture_hessians, seed 0); saved to
    CACHE/hessians.npz (reused if present with the same settings).
 2. Starts `TORCH_PYTHON this_script --run-official ...` as a worker (a Python
    with torch, torch.set_num_threads(--threads 2)) that runs, on request, the
    official GPTQ(nn.Linear).fasterquant(...) with gptq.H = 2 H (float32, the
    official scaling 2/n Σ x xᵀ) and Quantizer.configure(bits, perchannel=True,
    sym=False, mse=False), timing fasterquant; its Q go to CACHE/official.npz.
 3. refq: quantize_weight(W, H, "gptq", ...) after one warm-up call per config
    (numba compile excluded); the whole API call is timed (it includes packing
    and the info["loss"] refq computes). numpy's BLAS keeps its default threads
    (set OPENBLAS_NUM_THREADS to change it).
    For each (layer, config) the two run alternately, --repeats times each, so
    that both see the same machine load; times are the minimum over the repeats.
 4. Both Q are scored with refq.layer_loss(W, Q, H) in float64 with the same H.
Prints a markdown table.
"""

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from harness import (OfficialWorker, add_calibration_arguments, full_names, gmean, key,  # noqa: E402
                     layers_npz, machine)

# label -> (bits, group_size or None, act_order); all asymmetric min-max, percdamp .01, blocksize 128
CONFIGS = {
    "w4 per-channel": (4, None, False),
    "w3 g128": (3, 128, False),
    "w3 g128 act_order": (3, 128, True),
    "w2 g64": (2, 64, False),
}
PERCDAMP = 0.01
BLOCKSIZE = 128


# ---------------------------------------------------------------------------
# official side (a worker process under a Python with torch)
# ---------------------------------------------------------------------------
def run_official(a):
    """Worker: reads `RUN name|label` / `SAVE` lines on stdin, answers one JSON line each."""
    import torch
    import torch.nn as nn
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.abspath(a.official_dir))
    reply = sys.stdout
    sys.stdout = sys.stderr                                # the official code prints; keep the pipe clean
    with contextlib.redirect_stdout(io.StringIO()):       # quant.py: "CUDA extension not installed."
        import gptq as off_gptq
        import quant as off_quant
    # fasterquant calls torch.cuda.synchronize(), which a CPU-only torch refuses
    torch.cuda.synchronize = lambda *args, **kw: None

    data = np.load(os.path.join(a.cache, "hessians.npz"))
    H2 = {}
    results = {}
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "SAVE":
            results["torch"] = np.array(torch.__version__)
            results["threads"] = np.int64(torch.get_num_threads())
            np.savez(os.path.join(a.cache, "official.npz"), **results)
            print(json.dumps({"ok": True}), file=reply, flush=True)
            continue
        name, label = arg.split("|")
        bits, g, act = CONFIGS[label]
        W = data["W_" + key(name)]                        # (out, in) float32
        if name not in H2:                                 # official scaling: 2/n Σ x xᵀ, float32
            H2 = {name: torch.from_numpy((2.0 * data["H_" + key(name)]).astype(np.float32))}
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = torch.from_numpy(W.copy())
        q = off_gptq.GPTQ(layer)
        q.quantizer = off_quant.Quantizer()
        q.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
        q.H = H2[name].clone()
        q.nsamples = a.nsamples * a.seqlen
        with contextlib.redirect_stdout(io.StringIO()):    # it prints time / error
            t0 = time.perf_counter()
            q.fasterquant(blocksize=BLOCKSIZE, percdamp=PERCDAMP, groupsize=g if g else -1,
                          actorder=act, static_groups=False)
            t = time.perf_counter() - t0
        results[f"Q|{name}|{label}"] = layer.weight.data.numpy().copy()
        print(json.dumps({"seconds": t}), file=reply, flush=True)


# ---------------------------------------------------------------------------
# refq side
# ---------------------------------------------------------------------------
def main_mode(a):
    sys.path.insert(0, REPO)
    from refq.api import layer_loss, quantize_weight

    os.makedirs(a.cache, exist_ok=True)
    names = full_names(a)
    hpath = os.path.join(a.cache, "hessians.npz")
    data = layers_npz(a, names, hpath)

    official = OfficialWorker(a.torch_python, __file__, [
        "--official-dir", a.official_dir,
        "--cache", a.cache, "--threads", str(a.threads),
        "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)])

    # warm-up: compile the numba kernel for every code path outside the timings
    rng = np.random.default_rng(0)
    Xw = rng.standard_normal((512, 256))
    for bits, g, act in CONFIGS.values():
        quantize_weight(rng.standard_normal((64, 256)).astype(np.float32), Xw.T @ Xw / 512, "gptq",
                        bits=bits, group_size=g, act_order=act)

    # side by side: for each (layer, config), refq and official alternate, --repeats times each
    rows = []
    for name in names:
        W = data["W_" + key(name)]
        H = data["H_" + key(name)]
        for label, (bits, g, act) in CONFIGS.items():
            t_refq, t_off = math.inf, math.inf
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                qw = quantize_weight(W, H, "gptq", bits=bits, group_size=g, act_order=act,
                                     percdamp=PERCDAMP, blocksize=BLOCKSIZE, name=name)
                t_refq = min(t_refq, time.perf_counter() - t0)
                t_off = min(t_off, official(f"RUN {name}|{label}")["seconds"])
            rows.append([name, label, layer_loss(W, qw.dequantize(), H), None, t_refq, t_off])
            print(f"{name} {label}: refq {t_refq:.3f} s, official {t_off:.3f} s", file=sys.stderr,
                  flush=True)
    official("SAVE")
    official.close()
    off = np.load(os.path.join(a.cache, "official.npz"))
    for r in rows:
        r[3] = layer_loss(data["W_" + key(r[0])], off[f"Q|{r[0]}|{r[1]}"], data["H_" + key(r[0])])

    print(f"\nrefq GPTQ vs official IST-DASLab/gptq `fasterquant` (blocksize {BLOCKSIZE}, percdamp "
          f"{PERCDAMP}, asym min-max). Loss = tr((W-Q) H (W-Q)ᵀ), float64, H = mean x xᵀ of "
          f"{a.nsamples} x {a.seqlen} tokens of {os.path.basename(a.calib)} (seed {a.seed}), dense "
          f"model. Times: min of {a.repeats}, the two alternating; refq = whole quantize_weight call after a numba "
          f"warm-up; official = fasterquant, torch {off['torch']} CPU, {int(off['threads'])} "
          "threads.\n")
    print("| layer | config | loss refq | loss official | ratio | time refq s | time official s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, lr, lo, tr, to in rows:
        print(f"| {name} | {label} | {lr:.5g} | {lo:.5g} | {lr / lo:.4f} | {tr:.3f} | {to:.3f} "
              f"| {tr / to:.2f} |")
    for label in list(CONFIGS) + [None]:
        sel = [r for r in rows if label is None or r[1] == label]
        lr = gmean([r[2] / r[3] for r in sel])
        tr_sum, to_sum = sum(r[4] for r in sel), sum(r[5] for r in sel)
        tr_g = gmean([r[4] / r[5] for r in sel])
        print(f"| **{'all' if label is None else label}** ({len(sel)}) | total / geomean | | | "
              f"{lr:.4f} | {tr_sum:.2f} | {to_sum:.2f} | {tr_g:.2f} |")
    worst = max(rows, key=lambda r: r[2] / r[3])
    print(f"\nRatios in the summary rows are geometric means; times are sums. Worst loss ratio: "
          f"{worst[2] / worst[3]:.4f} ({worst[0]}, {worst[1]}).")
    print(f"Command: `python benchmarks/bench_gptq_official.py --official-dir OFFICIAL "
          f"--layers {a.layers} --linears {a.linears} --nsamples {a.nsamples} --seqlen {a.seqlen} "
          f"--repeats {a.repeats} --threads {a.threads}`")
    blas = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"Machine: {machine()}; numpy {np.__version__} (BLAS threads: {blas}).")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-dir", required=True, help="folder with the official gptq.py, quant.py")
    ap.add_argument("--torch-python", default="/tmp/tfenv/bin/python",
                    help="a Python with torch (+ transformers, which gptq.py imports)")
    ap.add_argument("--cache", default="/tmp/refq-gptq-official", help="folder for the npz files")
    add_calibration_arguments(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the official code")
    ap.add_argument("--run-official", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run_official:
        run_official(a)
    else:
        main_mode(a)


if __name__ == "__main__":
    main()
