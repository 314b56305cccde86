"""refq's QuantEase vs the official code (linkedin/QuantEase) on real SmolLM2 layers.

A benchmark, not a test.  The official code is NOT part of refq: export it
yourself (e.g. `git clone https://github.com/linkedin/QuantEase /tmp/scratch/QuantEase`)
and pass the folder holding its `method/` package with --official-dir.

    python benchmarks/bench_quantease_official.py --official-dir /tmp/scratch/QuantEase \
        --cache /tmp/refq-layers/hessians.npz [--torch-python /tmp/tfenv/bin/python]

The cache is an .npz with W_{layer}_{name} (out, in) float32 and H_{...}
(in, in) float64 = mean x xᵀ (benchmarks/bench_gptq_official.py writes one:
SmolLM2-135M, data/calib.txt, dense layer-by-layer pass, seed 0).

Official side (worker under a Python with torch, 1 thread): QuantEase(nn.Linear)
with XtX = H (float32; the CD update is invariant to the scale of H),
quant.Quantizer.configure(bits, perchannel=True, sym=False), fasterquant(
group_size, actorder=True), 30 iterations (its relaxed sweeps included).
torch.cuda.Event / synchronize are replaced by no-ops (CPU).  The outlier
variant (quantease_outlier.QuantEaseOutlier, outlier=p, unstructured) is run
too and its dense part checked for being on its own grid.

refq side: quantize_weight(W, H, "quantease", bits, group_size, act_order=True,
iters=30, init=gptq|rtn) (numba warmed up first; NUMBA_NUM_THREADS=1).
Both results are scored with refq.layer_loss(W, Q, H) in float64.  The grids
have the same parameters (min-max per row/group, b-bit codes, act_order), so
the two are at the same bits per weight; refq additionally rounds its scales
to float16 (what it stores), the official keeps float32 scales.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from harness import add_npz_arguments, npz_main  # noqa: E402

CONFIGS = {"w4 per-channel": (4, None), "w3 g128": (3, 128), "w3 per-channel": (3, None)}
LAYERS = ["0_self_attn_q_proj", "0_mlp_down_proj", "10_self_attn_o_proj", "10_mlp_up_proj",
          "20_self_attn_q_proj", "20_mlp_down_proj"]


def run_official(a):
    import torch
    import torch.nn as nn
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.abspath(a.official_dir))

    class _Event:                                       # CPU: fasterquant times with CUDA events
        def __init__(self, **kw):
            pass

        def record(self):
            pass

        def elapsed_time(self, other):
            return 0.0
    torch.cuda.Event = _Event
    torch.cuda.synchronize = lambda *args, **kw: None
    torch.cuda.empty_cache = lambda *args, **kw: None
    with contextlib.redirect_stdout(io.StringIO()):
        from method.quant import Quantizer
        from method.quantease import QuantEase
        from method.quantease_outlier import QuantEaseOutlier
    data = np.load(a.cache)
    res = {}
    for key in a.layers:
        W = torch.tensor(data["W_" + key], dtype=torch.float32)
        H = torch.tensor(data["H_" + key], dtype=torch.float32)
        jobs = [(label, bits, g, 0.0) for label, (bits, g) in CONFIGS.items()]
        jobs.append(("w3 per-channel + outliers", 3, None, a.outlier_frac))
        for label, bits, g, frac in jobs:
            layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
            layer.weight.data = W.clone()
            if frac:
                q = QuantEaseOutlier(layer, num_iter=a.iters, outlier=frac, structure_outlier=False)
            else:
                q = QuantEase(layer, num_iter=a.iters)
            q.XtX = H.clone()
            q.quantizer = Quantizer()
            q.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
            tick = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                scale, zero, _ = q.fasterquant(group_size=g or -1, actorder=True)
            sec = time.perf_counter() - tick
            if frac:
                dense = q.W.float()
                Q = dense + q.S.float()
                # is the dense part on the grid it returned (per-channel)?
                s, z = scale[:, :1], zero[:, :1]
                on = torch.clamp(torch.round(dense / s) + z, 0, 2 ** bits - 1)
                off_grid = float((s * (on - z) - dense).abs().gt(1e-6).float().mean())
                extra = {"off_grid": off_grid, "nnz": int((q.S != 0).sum())}
            else:
                Q = layer.weight.data.float()
                extra = {}
            res[f"{key}|{label}"] = dict(Q=Q.numpy().astype(np.float64), seconds=sec, **extra)
            print(f"official {key} {label}: {sec:.1f}s", file=sys.stderr, flush=True)
    np.savez(a.out_npz, **{k + "|Q": v.pop("Q") for k, v in res.items()})
    with open(a.out_npz + ".json", "w") as f:
        json.dump(res, f)


def main():
    p = argparse.ArgumentParser()
    add_npz_arguments(p, LAYERS, "/tmp/scratch/quantease_official.npz")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--outlier-frac", type=float, default=0.01)
    a, off, offj, data = npz_main(p, run_official, __file__, lambda a: [
        "--iters", str(a.iters), "--outlier-frac", str(a.outlier_frac)])
    import refq
    rng = np.random.default_rng(0)                                 # numba warm-up
    Wt, Ht = rng.standard_normal((8, 16)).astype(np.float32), np.eye(16)
    refq.quantize_weight(Wt, Ht, "quantease", iters=1)
    refq.quantize_weight(Wt, Ht, "quantease", iters=1, outlier_frac=0.05)
    print("| layer | config | bits/weight (refq) | GPTQ loss | official loss | refq (init gptq) | refq (init rtn) "
          "| refq best / official | official s | refq gptq-init s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for key in a.layers:
        W, H = data["W_" + key], data["H_" + key]
        for label, (bits, g) in CONFIGS.items():
            kw = dict(bits=bits, group_size=g, act_order=True, iters=a.iters)
            gp = refq.quantize_weight(W, H, "gptq", bits=bits, group_size=g, act_order=True)
            tick = time.perf_counter()
            qg = refq.quantize_weight(W, H, "quantease", init="gptq", **kw)
            sec = time.perf_counter() - tick
            qr = refq.quantize_weight(W, H, "quantease", init="rtn", **kw)
            lo = refq.layer_loss(W, off[f"{key}|{label}|Q"], H)
            best = min(qg.info["loss"], qr.info["loss"])
            ratios.append(qg.info["loss"] / lo)
            print(f"| {key} | {label} | {qg.bits_per_weight:.4f} | {gp.info['loss']:.5g} | {lo:.5g} "
                  f"| {qg.info['loss']:.5g} | {qr.info['loss']:.5g} | {best / lo:.3f} "
                  f"| {offj[f'{key}|{label}']['seconds']:.1f} | {sec:.1f} |", flush=True)
        label = "w3 per-channel + outliers"
        o = offj[f"{key}|{label}"]
        lo = refq.layer_loss(W, off[f"{key}|{label}|Q"], H)
        qo = refq.quantize_weight(W, H, "quantease", bits=3, act_order=True, iters=a.iters,
                                  outlier_frac=a.outlier_frac)
        print(f"| {key} | w3 pc + {a.outlier_frac:g} outliers | {qo.bits_per_weight:.4f} | - | {lo:.5g} "
              f"(dense part off its grid: {100 * o['off_grid']:.0f}%) | {qo.info['loss']:.5g} | - "
              f"| - | {o['seconds']:.1f} | {qo.info['seconds']:.1f} |", flush=True)
    print(f"\nrefq (init gptq) / official loss: geometric mean {np.exp(np.mean(np.log(ratios))):.3f}, "
          f"max {max(ratios):.3f} over {len(ratios)} (layer, config) pairs")


if __name__ == "__main__":
    main()
