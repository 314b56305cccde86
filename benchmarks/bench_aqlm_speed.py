"""refq's AQLM now vs an older version of refq/methods/aqlm.py, same (W, H), interleaved.

    git show 3d428a4:refq/methods/aqlm.py > /tmp/aqlm_old.py
    NUMBA_NUM_THREADS=1 python benchmarks/bench_aqlm_speed.py --old /tmp/aqlm_old.py \
        [--cache /tmp/refq-layers/hessians.npz] [--layers 0_self_attn_q_proj,0_mlp_up_proj,20_mlp_down_proj]

The cache is that of bench_gptq_official.py (real SmolLM2 W and H = mean x xᵀ
of 32 x 512 calibration tokens). Both versions run `quantize_aqlm` with their
default options (2x8 g8); for each layer the old one runs first, then the new
one, after a small warm-up of each (numba compilation). Prints a markdown table
of times and final losses.
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="an older refq/methods/aqlm.py")
    ap.add_argument("--cache", default="/tmp/refq-layers/hessians.npz")
    ap.add_argument("--layers", default="0_self_attn_q_proj,0_mlp_up_proj,20_mlp_down_proj")
    a = ap.parse_args()
    from refq.methods import aqlm as new
    spec = importlib.util.spec_from_file_location("aqlm_old", a.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    for mod in (old, new):                                   # compile outside the timings
        mod.quantize_aqlm(rng.standard_normal((64, 64)), np.eye(64), dict(mod.DEFAULTS, max_iters=3))
    data = np.load(a.cache)
    print("| layer | old s | new s | time new / old | loss old | loss new | loss new / old |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in a.layers.split(","):
        W, H = data["W_" + name].astype(np.float64), data["H_" + name].astype(np.float64)
        res = []
        for mod in (old, new):
            t = time.perf_counter()
            q = mod.quantize_aqlm(W, H, dict(mod.DEFAULTS), name)
            res.append((time.perf_counter() - t, q.info["loss"]))
        (to, lo), (tn, ln) = res
        print(f"| {name} | {to:.1f} | {tn:.1f} | {tn / to:.2f} | {lo:.6g} | {ln:.6g} | {ln / lo:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
