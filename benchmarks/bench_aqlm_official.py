"""refq's AQLM vs the official AQLM code (Vahe1994/AQLM) on real SmolLM2 layers.

This is a benchmark, not a test. The official code is NOT part of refq: fetch
it yourself (e.g. `git clone https://github.com/Vahe1994/AQLM /tmp/aqlm`) and
pass its folder with --official-dir; this script only imports its
aq_engine.py and src/ from there, in a worker process under a Python with
torch (--torch-python).

    python benchmarks/bench_aqlm_official.py --official-dir /tmp/aqlm \
        [--configs 2x8,1x16] [--names 0.self_attn.q_proj,...] [--cache /tmp/refq-layers]

Steps:
 1. (W, H) of the chosen linears: CACHE/hessians.npz as written by
    benchmarks/bench_gptq_official.py (H = mean x xᵀ of 32 x 512 tokens of
    data/calib.txt through the dense model, seed 0); built with its
    build_cache if missing.
 2. official: the AQEngine of aq_engine.py on an nn.Linear holding W, with
    AQEngine.XTX = H (float64, its own convention: the mean of x xᵀ), and the
    arguments of its main.py defaults except these, fixed here:
    out_group_size 1, scale_nbits 0 (one scale per row), codebook_value_nbits
    16, init_max_iter 100, lr 1e-4, steps_per_epoch 100, beam_size 1,
    relative_mse_tolerance 0.01, max_epochs 100, torch.manual_seed(0) and
    random.seed(0); AQ_USE_JIT=0 (its torch.jit path is ~10x slower on the
    CPU). Timed: AQEngine.quantize; W_hat = quantized_weight() in float32
    (its codebooks and scales not rounded to fp16, which can only favour it).
 3. refq: quantize_weight(W, H, "aqlm", num_codebooks=M, nbits_per_codebook=B,
    in_group_size=8, relative_tolerance 0.01, max_iters 100) after a numba
    warm-up; the whole API call is timed (float16 codebooks and scales).
 4. Both W_hat scored with refq.layer_loss(W, W_hat, H) in float64.
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
from harness import OfficialWorker, build_cache, key, machine, settings  # noqa: E402

CONFIGS = {"2x8": (2, 8), "1x16": (1, 16), "1x8": (1, 8), "4x8": (4, 8)}
GROUP = 8
TOL = 0.01
MAX_ITERS = 100


def key(name):
    return name.replace(".", "_")


# ---------------------------------------------------------------------------
# official side (a worker process under a Python with torch)
# ---------------------------------------------------------------------------
def run_official(a):
    """Worker: reads `RUN name|config` lines on stdin, answers one JSON line each."""
    os.environ["AQ_USE_JIT"] = "0"
    import random
    from argparse import Namespace

    import torch
    import torch.nn as nn
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.abspath(a.official_dir))
    reply = sys.stdout
    sys.stdout = sys.stderr                                # the official code prints; keep the pipe clean
    from aq_engine import AQEngine

    data = np.load(os.path.join(a.cache, "hessians.npz"))
    for line in sys.stdin:
        name, _, cfg = line.strip().partition(" ")[2].partition("|")
        M, B = CONFIGS[cfg]
        W = data["W_" + key(name)]                        # (out, in) float32
        H = data["H_" + key(name)]                        # (in, in) float64, mean x xᵀ
        torch.manual_seed(0)
        random.seed(0)
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = torch.from_numpy(W.copy())
        eng = AQEngine(layer)
        eng.XTX = torch.from_numpy(H.copy())
        args = Namespace(devices=[torch.device("cpu")], out_group_size=1, in_group_size=GROUP,
                         num_codebooks=M, nbits_per_codebook=B, codebook_value_nbits=16,
                         codebook_value_num_groups=1, scale_nbits=0, init_max_iter=100,
                         init_max_points_per_centroid=None, lr=1e-4, max_epochs=MAX_ITERS,
                         steps_per_epoch=100, relative_mse_tolerance=TOL, beam_size=1,
                         print_frequency=10 ** 9)
        err = None
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stderr(io.StringIO()):   # progress bars
                qw = eng.quantize(args=args, verbose=False)
            t = time.perf_counter() - t0
            with torch.no_grad():
                What = qw().detach().numpy().astype(np.float64)
            np.save(os.path.join(a.out_dir, f"aqlm_official_{key(name)}_{cfg}.npy"), What)
        except Exception as e:                             # e.g. its k-means with fewer points than codes
            t, err = time.perf_counter() - t0, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(json.dumps({"seconds": t, "error": err, "torch": torch.__version__,
                          "threads": torch.get_num_threads()}), file=reply, flush=True)


# ---------------------------------------------------------------------------
# refq side
# ---------------------------------------------------------------------------
def main_mode(a):
    sys.path.insert(0, REPO)
    from refq.api import layer_loss, quantize_weight

    hpath = os.path.join(a.cache, "hessians.npz")
    os.makedirs(a.out_dir, exist_ok=True)
    if not os.path.isfile(hpath):
        ga = argparse.Namespace(layers="0,10,20", linears="q_proj,o_proj,up_proj,down_proj",
                                nsamples=32, seqlen=512, seed=0, model=None,
                                calib=os.path.join(REPO, "data", "calib.txt"))
        os.makedirs(a.cache, exist_ok=True)
        names_all = [f"{l}.{n}" for l in (0, 10, 20) for n in
                     ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
        build_cache(ga, names_all, hpath)
        assert str(np.load(hpath)["settings"]) == settings(ga)
    data = np.load(hpath)

    official = OfficialWorker(a.torch_python, __file__, [
        "--official-dir", a.official_dir,
        "--cache", a.cache, "--out-dir", a.out_dir, "--threads", str(a.threads)])

    # numba warm-up (compilation outside the timings): both codebook solvers, beam 1
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1024, 64))
    for M, B in ((2, 4), (1, 12)):
        quantize_weight(rng.standard_normal((1024, 64)).astype(np.float32), X.T @ X / 1024, "aqlm",
                        num_codebooks=M, nbits_per_codebook=B, in_group_size=GROUP, max_iters=2)

    rows = []
    for cfg in a.configs.split(","):
        M, B = CONFIGS[cfg]
        names = a.names_1x16 if cfg == "1x16" else a.names
        for name in names.split(","):
            W, H = data["W_" + key(name)], data["H_" + key(name)]
            off = official(f"RUN {name}|{cfg}")
            t0 = time.perf_counter()
            qw = quantize_weight(W, H, "aqlm", num_codebooks=M, nbits_per_codebook=B,
                                 in_group_size=GROUP, relative_tolerance=TOL, max_iters=MAX_ITERS,
                                 name=name)
            t_refq = time.perf_counter() - t0
            l_refq = layer_loss(W, qw.dequantize(), H)
            l_off = None
            if off["error"] is None:
                l_off = layer_loss(W, np.load(os.path.join(
                    a.out_dir, f"aqlm_official_{key(name)}_{cfg}.npy")), H)
            rows.append(dict(name=name, cfg=cfg, l_refq=l_refq, l_off=l_off, t_refq=t_refq,
                             t_off=off["seconds"], err=off["error"], iters=qw.info["iterations"],
                             bpw=qw.bits_per_weight))
            print(f"{name} {cfg}: refq {l_refq:.5g} in {t_refq:.1f} s ({qw.info['iterations']} it), "
                  f"official {l_off if l_off is None else f'{l_off:.5g}'} in {off['seconds']:.1f} s "
                  f"{off['error'] or ''}", file=sys.stderr, flush=True)
    official.close()

    print(f"\nrefq AQLM vs official Vahe1994/AQLM AQEngine, in_group_size {GROUP}, beam 1, "
          f"relative tolerance {TOL}. Loss = tr((W-Q) H (W-Q)ᵀ), float64, H = mean x xᵀ "
          f"(CACHE/hessians.npz). Official: torch {off['torch']} CPU, {off['threads']} threads.\n")
    print("| layer | config | bits/w | loss refq | loss official | ratio | refq rounds | "
          "time refq s | time official s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo = "failed: " + r["err"] if r["err"] else f"{r['l_off']:.5g}"
        ratio = "" if r["err"] else f"{r['l_refq'] / r['l_off']:.4f}"
        print(f"| {r['name']} | {r['cfg']} | {r['bpw']:.3f} | {r['l_refq']:.5g} | {lo} | {ratio} | "
              f"{r['iters']} | {r['t_refq']:.1f} | {r['t_off']:.1f} | "
              f"{'' if r['err'] else f'{r_t(r):.2f}'} |")
    ok = [r for r in rows if not r["err"]]
    for cfg in a.configs.split(","):
        sel = [r for r in ok if r["cfg"] == cfg]
        if sel:
            lr = math.exp(sum(math.log(r["l_refq"] / r["l_off"]) for r in sel) / len(sel))
            tr, to = sum(r["t_refq"] for r in sel), sum(r["t_off"] for r in sel)
            print(f"| **{cfg}** ({len(sel)}) | | | | | {lr:.4f} (geomean) | | {tr:.1f} | {to:.1f} | "
                  f"{tr / to:.2f} (totals) |")
    print(f"\nCommand: `python benchmarks/bench_aqlm_official.py --official-dir OFFICIAL "
          f"--configs {a.configs} --names {a.names} --names-1x16 {a.names_1x16} "
          f"--threads {a.threads}`")
    blas = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    numba_t = os.environ.get("NUMBA_NUM_THREADS") or "default"
    print(f"Machine: {machine()}; numpy {np.__version__} (BLAS threads: {blas}, numba threads: "
          f"{numba_t}).")


def r_t(r):
    return r["t_refq"] / r["t_off"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-dir", required=True, help="folder with the official aq_engine.py and src/")
    ap.add_argument("--torch-python", default="/tmp/tfenv/bin/python", help="a Python with torch")
    ap.add_argument("--cache", default="/tmp/refq-layers", help="folder of hessians.npz")
    ap.add_argument("--out-dir", default="/tmp/refq-aqlm-official", help="folder for the official W_hat")
    ap.add_argument("--configs", default="2x8,1x16")
    ap.add_argument("--names", default="0.self_attn.q_proj,10.self_attn.o_proj,"
                                       "10.mlp.up_proj,20.mlp.down_proj")
    ap.add_argument("--names-1x16", default="10.mlp.up_proj",
                    help="layers for 1x16 (needs >= 65536 groups: not the 576x576 ones)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the official code")
    ap.add_argument("--run-official", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run_official:
        run_official(a)
    else:
        main_mode(a)


if __name__ == "__main__":
    main()
