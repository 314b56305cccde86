"""refq's SqueezeLLM vs the official code (SqueezeAILab/SqueezeLLM) on real SmolLM2 layers.

A benchmark, not a test.  The official code is NOT part of refq: export
quantization/nuq.py, squeezellm/outliers.py and squeezellm/model_parse.py of
https://github.com/SqueezeAILab/SqueezeLLM into a folder and pass it with
--official-dir (the worker imports `kmeans_fit` from nuq.py and
`remove_outliers` from squeezellm/outliers.py).

    python benchmarks/bench_squeezellm_official.py --official-dir /tmp/scratch/SqueezeLLM \
        --cache /tmp/refq-layers/hessians.npz [--torch-python /tmp/tfenv/bin/python]

Same sensitivity on both sides: F[r, c] = H_cc (refq's default "hessian_diag";
the paper's Fisher needs gradients).  Official side (worker, torch/sklearn, one
thread): outliers by its IQR rule (generate_outlier_config.py's threshold with
--range r, then remove_outliers), then per row nuq.kmeans_fit = sklearn KMeans
(2^b clusters, random_state 0, n_init auto, max_iter 50) with sample_weight
F * (w != 0); Ŵ = centroid of the label, and w itself at the outliers (its
packing subtracts the centroid of 0 from the stored outlier, so the sum is w).
refq side: quantize_weight(W, H, "squeezellm", bits, outlier_iqr=r) (exact
weighted k-means by DP, fp16 tables).  Scored with the weighted k-means
objective Σ F (W - Ŵ)² (what both minimise) and refq.layer_loss.  Bits are
refq's exact count; the official stores the same fields (codes, one table
per row, the same outliers), with fp32 instead of fp16 tables.
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
from harness import add_npz_arguments, npz_main  # noqa: E402

LAYERS = ["0_self_attn_q_proj", "0_mlp_down_proj", "10_self_attn_o_proj", "10_mlp_up_proj",
          "20_self_attn_q_proj", "20_mlp_down_proj"]
CONFIGS = {"w3": (3, math.inf), "w4": (4, math.inf), "w3 + IQR r=4": (3, 4.0)}


def run_official(a):
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.abspath(a.official_dir))
    sys.path.insert(0, os.path.join(os.path.abspath(a.official_dir), "quantization"))
    with contextlib.redirect_stdout(io.StringIO()):
        import squeezellm.outliers as off_outliers
        from nuq import kmeans_fit
    if not hasattr(np, "cast") or "cast" not in np.__dict__:   # nuq.py uses np.cast (numpy < 2)
        np.cast = {"byte": lambda x: np.asarray(x, dtype=np.uint8)}
    data = np.load(a.cache)
    res, Qs = {}, {}
    for key in a.layers:
        W0 = data["W_" + key].astype(np.float32)
        F = np.broadcast_to(np.diag(data["H_" + key]), W0.shape).astype(np.float32)
        for label, (bits, r) in CONFIGS.items():
            tick = time.perf_counter()
            W = W0
            mask = np.zeros(W.shape, dtype=bool)
            if math.isfinite(r):                         # generate_outlier_config.py + remove_outliers
                q1, q3 = np.quantile(W0, 0.25), np.quantile(W0, 0.75)
                lo, hi = q1 - r * (q3 - q1), q3 + r * (q3 - q1)
                thr = max(abs(lo), abs(hi))
                with contextlib.redirect_stdout(io.StringIO()):
                    outl = off_outliers.remove_outliers({"w": torch.tensor(W0).clone()}, 0,
                                                        {"w": thr})
                sparse = outl[0][0].numpy()
                mask = sparse != 0
                W = np.where(mask, 0.0, W0).astype(np.float32)
            Q = np.empty(W.shape)
            for i in range(W.shape[0]):                  # nuq.py, one task per row
                sw = F[i] * (W[i] != 0)
                if np.sum(sw) == 0:
                    sw = np.ones_like(sw)
                cents, labels = kmeans_fit((W[i].reshape(-1, 1), sw, 2 ** bits))
                Q[i] = cents[labels.astype(np.int64)]
            Q = np.where(mask, W0, Q)
            sec = time.perf_counter() - tick
            Qs[f"{key}|{label}"] = Q
            res[f"{key}|{label}"] = {"seconds": sec, "nnz": int(mask.sum())}
            print(f"official {key} {label}: {sec:.1f}s", file=sys.stderr, flush=True)
    np.savez(a.out_npz, **Qs)
    with open(a.out_npz + ".json", "w") as f:
        json.dump(res, f)


def main():
    p = argparse.ArgumentParser()
    add_npz_arguments(p, LAYERS, "/tmp/scratch/squeezellm_official.npz")
    a, off, offj, data = npz_main(p, run_official, __file__)
    import refq
    rng = np.random.default_rng(0)                                   # numba warm-up
    refq.quantize_weight(rng.standard_normal((4, 32)).astype(np.float32), np.eye(32), "squeezellm")
    print("| layer | config | refq bits/weight | outliers (official / refq) | official k-means obj "
          "| refq k-means obj | obj refq / official | official loss | refq loss | loss refq / official "
          "| official s | refq s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    objr, lossr = [], []
    for key in a.layers:
        W, H = data["W_" + key].astype(np.float64), data["H_" + key]
        F = np.diag(H)[None, :]
        for label, (bits, r) in CONFIGS.items():
            tick = time.perf_counter()
            q = refq.quantize_weight(W.astype(np.float32), H, "squeezellm", bits=bits, outlier_iqr=r)
            sec = time.perf_counter() - tick
            Qo = off[f"{key}|{label}"]
            Qr = q.dequantize().astype(np.float64)
            oo, orr = float(np.sum(F * (W - Qo) ** 2)), float(np.sum(F * (W - Qr) ** 2))
            lo, lr = refq.layer_loss(W, Qo, H), q.info["loss"]
            objr.append(orr / oo)
            lossr.append(lr / lo)
            o = offj[f"{key}|{label}"]
            print(f"| {key} | {label} | {q.bits_per_weight:.4f} | {o['nnz']} / {q.outliers.nnz} "
                  f"| {oo:.5g} | {orr:.5g} | {orr / oo:.3f} | {lo:.5g} | {lr:.5g} | {lr / lo:.3f} "
                  f"| {o['seconds']:.1f} | {sec:.2f} |", flush=True)
    gm = lambda v: float(np.exp(np.mean(np.log(v))))                 # noqa: E731
    print(f"\nrefq / official: weighted k-means objective geometric mean {gm(objr):.3f} "
          f"(max {max(objr):.3f}); layer loss geometric mean {gm(lossr):.3f} (max {max(lossr):.3f}) "
          f"over {len(objr)} (layer, config) pairs")


if __name__ == "__main__":
    main()
