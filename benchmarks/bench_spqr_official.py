"""refq's SpQR vs the official code (Vahe1994/SpQR) on real SmolLM2 layers.

A benchmark, not a test.  The official code is NOT part of refq: export
spqr_engine.py, quant_groups.py, weight_permutation.py of
https://github.com/Vahe1994/SpQR into a folder and pass it with --official-dir.

    python benchmarks/bench_spqr_official.py --official-dir /tmp/scratch/SpQR \
        --cache /tmp/refq-layers/hessians.npz [--torch-python /tmp/tfenv/bin/python]

Cache: W_{layer}_{name} (out, in) float32, H_{...} (in, in) float64 = mean x xᵀ.

Official side (worker, torch, 1 thread): SPQRUtil(nn.Linear) with H = 2 H (its
2/n Σ x xᵀ scaling; the relative outlier threshold does not depend on it),
quantize(bits, groupsize 16, perchannel, qq_scale_bits 3, qq_zero_bits 3,
qq_groupsize 16, round_zero False, outlier_relative_threshold τ,
permutation_order act_order, simplified_outliers False, percdamp) as in its
README.  Its bits per weight are its own formula (main.py
get_average_number_of_bits): b + (3 + 3)/16 + 2·32/256 + 32 · outlier share,
which leaves out the permutation and the CSR row pointers.

refq side: quantize_weight(W, H, "spqr", bits, group_size 16, qq_bits 3,
qq_group_size 16, outlier_threshold τ, act_order, percdamp); bits per weight
is every stored byte.  Both Q scored with refq.layer_loss(W, Q, H).
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

LAYERS = ["0_self_attn_q_proj", "0_self_attn_o_proj", "0_mlp_up_proj", "0_mlp_down_proj",
          "10_self_attn_q_proj", "10_self_attn_o_proj", "10_mlp_up_proj", "10_mlp_down_proj",
          "20_self_attn_q_proj", "20_self_attn_o_proj", "20_mlp_up_proj", "20_mlp_down_proj"]
# label -> (bits, outlier threshold τ, percdamp)
CONFIGS = {"w3 g16 τ0.2": (3, 0.2, 1.0), "w4 g16 τ0.2": (4, 0.2, 1.0),
           "w3 g16 no outliers": (3, float("inf"), 1.0), "w3 g16 τ0.2 percdamp .01": (3, 0.2, 0.01)}


def official_bits(bits, share, g=16, qg=16, qq=3):
    return bits + (qq + qq) / g + 2 * (16 + 16) / (g * qg) + 32 * share


def run_official(a):
    import torch
    import torch.nn as nn
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.abspath(a.official_dir))
    with contextlib.redirect_stdout(io.StringIO()):
        from spqr_engine import SPQRUtil
    data = np.load(a.cache)
    res, Qs = {}, {}
    for key in a.layers:
        W = torch.tensor(data["W_" + key], dtype=torch.float32)
        H = torch.tensor(2 * data["H_" + key], dtype=torch.float32)
        for label, (bits, tau, damp) in CONFIGS.items():
            layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
            layer.weight.data = W.clone()
            u = SPQRUtil(layer)
            u.H = H.clone()
            tick = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                r = u.quantize(bits=bits, blocksize=128, percdamp=damp, groupsize=16,
                               outlier_relative_threshold=tau, permutation_order="act_order",
                               simplified_outliers=False, perchannel=True, sym=False,
                               qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=16, round_zero=False,
                               verbose=False)
            sec = time.perf_counter() - tick
            nnz = int(r.unstructured_outlier_mask.sum())
            Qs[f"{key}|{label}"] = r.weight.numpy().astype(np.float64)
            res[f"{key}|{label}"] = {"seconds": sec, "nnz": nnz}
            print(f"official {key} {label}: {sec:.1f}s, {nnz} outliers", file=sys.stderr, flush=True)
    np.savez(a.out_npz, **Qs)
    with open(a.out_npz + ".json", "w") as f:
        json.dump(res, f)


def main():
    p = argparse.ArgumentParser()
    add_npz_arguments(p, LAYERS, "/tmp/scratch/spqr_official.npz")
    a, off, offj, data = npz_main(p, run_official, __file__)
    import refq
    rng = np.random.default_rng(0)                                  # numba warm-up
    refq.quantize_weight(rng.standard_normal((16, 32)).astype(np.float32), np.eye(32), "spqr")
    print("| layer | config | official bits (own formula) | official bits (counted like refq) "
          "| refq bits (all stored) | official outliers | refq outliers | official loss | refq loss "
          "| refq / official | official s | refq s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios, dbits, matched = [], [], []   # matched: refq bits - official bits counted like refq
    for key in a.layers:
        W, H = data["W_" + key], data["H_" + key]
        for label, (bits, tau, damp) in CONFIGS.items():
            tick = time.perf_counter()
            q = refq.quantize_weight(W, H, "spqr", bits=bits, group_size=16, qq_bits=3,
                                     qq_group_size=16, outlier_threshold=tau, act_order=True,
                                     percdamp=damp)
            sec = time.perf_counter() - tick
            o = offj[f"{key}|{label}"]
            lo = refq.layer_loss(W, off[f"{key}|{label}"], H)
            ob = official_bits(bits, o["nnz"] / W.size)
            ratios.append(q.info["loss"] / lo)
            dbits.append(q.bits_per_weight - ob)
            # the official formula leaves out what refq also stores: the permutation
            # (16 bits per column) and the CSR row pointers (32 bits per row + 1)
            out, n = W.shape
            ob_full = ob + 16 / out + (32 * (out + 1) / (out * n) if o["nnz"] else 0.0)
            matched.append(q.bits_per_weight - ob_full)
            print(f"| {key} | {label} | {ob:.4f} | {ob_full:.4f} | {q.bits_per_weight:.4f} | {o['nnz']} "
                  f"| {q.outliers.nnz} | {lo:.5g} | {q.info['loss']:.5g} | {q.info['loss'] / lo:.3f} "
                  f"| {o['seconds']:.1f} | {sec:.2f} |", flush=True)
    print(f"\nrefq / official loss: geometric mean {np.exp(np.mean(np.log(ratios))):.3f}, "
          f"max {max(ratios):.3f}; refq bits - official bits: mean {np.mean(dbits):+.4f}, "
          f"max {max(dbits):+.4f} over {len(ratios)} (layer, config) pairs")
    print(f"refq bits - official bits counted like refq: mean {np.mean(matched):+.4f}, "
          f"min {min(matched):+.4f}, max {max(matched):+.4f}")

if __name__ == "__main__":
    main()
