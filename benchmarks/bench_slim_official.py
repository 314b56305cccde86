"""refq's SLiM pieces vs the official SLiM code on the same real (W, H).

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_slim_official.py \\
        --official-dir /tmp/scratch/slim --layers /tmp/refq-layers/hessians.npz \\
        [--torch-python /tmp/tfenv/bin/python] [--cache /tmp/refq-slim-official.npz]

Two processes: this one (refq's Python, no torch) runs refq and scores;
a worker (--torch-python, torch CPU, 1 thread) runs the official code once for
every case and layer and caches its W_hat and times in --cache (delete it to
re-run the official side).

--official-dir: a folder holding the official repository's `slim/` package
(Mohammad-Mozaffari/slim, e.g. `git archive HEAD slim | tar -x -C DIR`),
kept OUTSIDE this repository and imported from there; it needs torch (CPU).
--layers: an .npz with W_<layer>_<name> (out, in) and H_<layer>_<name>
(in, in) = mean x xᵀ; any keys of that form are used.

The official code is written for CUDA; to run it on the CPU this script
 - makes Tensor.cuda() and torch.cuda.synchronize() no-ops,
 - puts a stub `triton` module in sys.modules (its triton kernels only serve
   tiled quantization) and, for the adapter quantization, replaces the
   triton kernels by the repository's own torch function for the tile
   parameters (compute_quantization_params_torch) plus a torch transcription
   of the kernels' arithmetic (x / α · m clamped to [-m-1, m], rounded half
   toward zero; x / m · α back).
Everything else is the official code as published.  The official pipeline
casts the adapters and the final weight to bf16 (as its code does); refq
stores fp16.  Both results are scored with refq.layer_loss in float64.

Cases (the official functions named are the ones its prune_and_quantize calls):
  magnitude 2:4         prune_nm(|W|)                        vs refq magnitude
  wanda 2:4             prune_nm(|W| sqrt(scaler_row))        vs refq wanda
  sparsegpt 2:4         SparseGPT.fasterprune(0.5, 2, 4)      vs refq sparsegpt
  sparsegpt 50%         SparseGPT.fasterprune(0.5)            vs refq sparsegpt --sparsity 0.5
  sparsegpt 2:4 w4      + its GPTQ Quantizer (per channel, asym) vs refq sparsegpt --bits 4
  slim-quant w4         Quantizer(slim_quant=True)            vs refq slim-quant
  wanda 2:4 + w4        prune_wanda's quantize_first path     vs refq slim --rank-ratio 0
  slim r0.1             add_lora(slim_lora, quantize_first)   vs refq slim (rank 0.1, fp16 adapters)
  slim r0.1 a4          add_lora with lora_tile_size 64 (the rank padded to a multiple of
                        64; SmolLM2's 576 is not a multiple of 128) + quantize_lora tiles of 64
                        vs refq slim --rank <same padded rank> --adapter-bits 4 --adapter-group-size 64
"""
import argparse
import os
import sys
import time
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_official(folder):
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    if "triton" not in sys.modules:                       # only imported, never run here
        triton = types.ModuleType("triton")
        triton.jit = lambda f=None, **k: f if f is not None else (lambda g: g)
        triton.cdiv = lambda a, b: -(-a // b)
        lang = types.ModuleType("triton.language")
        lang.constexpr = int
        triton.language = lang
        sys.modules["triton"] = triton
        sys.modules["triton.language"] = lang
    sys.path.insert(0, folder)
    import slim.lora as lora
    import slim.quantization.quantization as qz
    import slim.quantization.utils as qu
    import slim.sparsegpt as sgpt
    import slim.utils as su

    def quantize_tensor(x, alphas, betas, q):                # the triton kernel's arithmetic
        rb, cb = x.shape[0] // alphas.shape[0], x.shape[1] // alphas.shape[1]
        a = alphas.repeat_interleave(rb, 0).repeat_interleave(cb, 1).float()
        m = 2.0 ** (q - 1) - 1
        v = torch.clamp(x.float() / a * m, -(m + 1), m)
        t = torch.trunc(v)
        return (t + (v - t > 0.5).float() - (v - t < -0.5).float()).to(torch.int8)

    def dequantize_tensor(x, alphas, betas, q, dtype=torch.float16):
        rb, cb = x.shape[0] // alphas.shape[0], x.shape[1] // alphas.shape[1]
        a = alphas.repeat_interleave(rb, 0).repeat_interleave(cb, 1)
        m = 2.0 ** (q - 1) - 1
        return (x.to(a.dtype) / m * a).to(dtype)

    qz.compute_quantization_params = qu.compute_quantization_params_torch
    qz.quantize_tensor = quantize_tensor
    qz.dequantize_tensor = dequantize_tensor
    return types.SimpleNamespace(torch=torch, lora=lora, qz=qz, sgpt=sgpt, su=su)


# --------------------------------------------------------------------------- official runs
def off_linear(O, W):
    lin = O.torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = O.torch.tensor(W, dtype=O.torch.float32)
    return lin


def off_mask(O, W, H, wanda):
    t = O.torch
    Wt = t.tensor(W, dtype=t.float32)
    metric = Wt.abs()
    if wanda:
        metric = metric * t.sqrt(t.tensor(np.diag(H), dtype=t.float32).reshape(1, -1))
    return O.su.prune_nm(metric, 2, 4)                     # True = pruned


def off_prune(O, W, H, wanda):
    Wt = O.torch.tensor(W, dtype=O.torch.float32)
    Wt[off_mask(O, W, H, wanda)] = 0
    return Wt.double().numpy()


def off_sparsegpt(O, W, H, sparsity, prune_n, bits=None):
    t = O.torch
    g = O.sgpt.SparseGPT(off_linear(O, W))
    g.H = t.tensor(2 * H, dtype=t.float32)                 # its H is 2/n Σ x xᵀ; scale-free anyway
    if bits:
        g.quantizer = O.sgpt.Quantizer()
        g.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    g.fasterprune(sparsity, prune_n=prune_n, prune_m=4 if prune_n else 0, blocksize=128)
    return g.layer.weight.data.double().numpy()


def off_slim_quant(O, W, bits=4):
    q = O.qz.Quantizer("weight", num_bits=bits, slim_quant=True)
    Wt = O.torch.tensor(W, dtype=O.torch.float32)
    return q.dequantize_absmax(q.quantize_weight(Wt)).double().numpy()


def off_wanda_quant(O, W, H, bits=4):
    """prune_wanda with lora_rank 0, quantize_first (default): Q(W), then the mask."""
    mask = off_mask(O, W, H, wanda=True)
    q = O.qz.Quantizer("weight", num_bits=bits, slim_quant=True)
    Wt = O.torch.tensor(W, dtype=O.torch.float32)
    Wq = q.dequantize_absmax(q.quantize_weight(Wt)).to(O.torch.bfloat16)
    Wq[mask] = 0
    return Wq.double().numpy()


def off_slim(O, W, H, rank_ratio=0.1, bits=4, tile=None):
    t = O.torch
    mask = off_mask(O, W, H, wanda=True)
    lin = off_linear(O, W)
    act = types.SimpleNamespace(scaler_row=t.tensor(np.diag(H), dtype=t.float32))
    q = O.qz.Quantizer("weight", num_bits=bits, slim_quant=True)
    O.lora.add_lora(lin, W_mask=mask, rank_ratio=rank_ratio, slim_lora=True, activations=act,
                    quantizer=q, prune_lora=False, separate_lora=True, lora_tile_size=tile,
                    quantize_first=True)
    left, right = lin.lora_left, lin.lora_right                # (in, r), (r, out)
    if tile:                                                   # quantize_lora (its main.py, after pruning)
        lq = O.qz.Quantizer("weight", num_bits=4, block_quantization=True, block_dim=tile,
                            column_wise_grouping=False)
        left = lq.dequantize_absmax(lq.quantize_weight(left.data.float()))
        right = lq.dequantize_absmax(lq.quantize_weight(right.data.float()))
    W_c = lin.weight.data.double()
    W_hat = W_c + (left.data.double() @ right.data.double()).T
    return W_hat.numpy(), left.shape[1]


# --------------------------------------------------------------------------- driver
CASES = ["magnitude 2:4", "wanda 2:4", "sparsegpt 2:4", "sparsegpt 50%", "sparsegpt 2:4 w4",
         "slim-quant w4", "wanda 2:4 + w4", "slim r0.1", "slim r0.1 a4"]


def layer_keys(data):
    return sorted((k[2:] for k in data.files if k.startswith("W_")),
                  key=lambda k: (int(k.split("_")[0]), k))


def official_worker(args):
    """Runs under the torch Python: every case on every layer -> args.cache (.npz)."""
    O = load_official(args.official_dir)
    O.torch.set_num_threads(args.threads)
    fns = {
        "magnitude 2:4": lambda W, H: off_prune(O, W, H, False),
        "wanda 2:4": lambda W, H: off_prune(O, W, H, True),
        "sparsegpt 2:4": lambda W, H: off_sparsegpt(O, W, H, 0.5, 2),
        "sparsegpt 50%": lambda W, H: off_sparsegpt(O, W, H, 0.5, 0),
        "sparsegpt 2:4 w4": lambda W, H: off_sparsegpt(O, W, H, 0.5, 2, bits=4),
        "slim-quant w4": lambda W, H: off_slim_quant(O, W),
        "wanda 2:4 + w4": lambda W, H: off_wanda_quant(O, W, H),
        "slim r0.1": lambda W, H: off_slim(O, W, H)[0],
    }
    data = np.load(args.layers)
    out = {}
    for case in args.cases:
        for k in layer_keys(data):
            W = data["W_" + k].astype(np.float32)
            H = data["H_" + k].astype(np.float64)
            t0 = time.perf_counter()
            if case == "slim r0.1 a4":
                W_hat, rank = off_slim(O, W, H, tile=64)
                out[f"rank|{case}|{k}"] = np.array(rank)
            else:
                W_hat = fns[case](W, H)
            out[f"time|{case}|{k}"] = np.array(time.perf_counter() - t0)
            out[f"W|{case}|{k}"] = W_hat
            print(f"official {case} {k}: {out[f'time|{case}|{k}']:.2f} s", file=sys.stderr, flush=True)
    np.savez(args.cache, **out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-dir", required=True)
    ap.add_argument("--layers", default="/tmp/refq-layers/hessians.npz")
    ap.add_argument("--torch-python", default="/tmp/tfenv/bin/python")
    ap.add_argument("--cache", default="/tmp/refq-slim-official.npz")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    if args.official_worker:
        return official_worker(args)
    import subprocess

    import refq
    if not os.path.exists(args.cache):
        subprocess.run([args.torch_python, os.path.abspath(__file__), "--official-worker",
                        "--official-dir", args.official_dir, "--layers", args.layers,
                        "--cache", args.cache, "--cases", ",".join(args.cases),
                        "--threads", str(args.threads)], check=True)
    off = np.load(args.cache)
    data = np.load(args.layers)
    refq_kw = {
        "magnitude 2:4": ("magnitude", {}), "wanda 2:4": ("wanda", {}),
        "sparsegpt 2:4": ("sparsegpt", {}), "sparsegpt 50%": ("sparsegpt", {"sparsity": 0.5}),
        "sparsegpt 2:4 w4": ("sparsegpt", {"bits": 4}), "slim-quant w4": ("slim-quant", {}),
        "wanda 2:4 + w4": ("slim", {"rank_ratio": 0.0}), "slim r0.1": ("slim", {}),
        "slim r0.1 a4": ("slim", {"adapter_bits": 4, "adapter_group_size": 64}),
    }
    # refq's act_weighted option, scored against the same official result
    variants = {"slim-quant w4": "slim-quant w4 (act_weighted)",
                "wanda 2:4 + w4": "wanda 2:4 + w4 (act_weighted)",
                "slim r0.1": "slim r0.1 (act_weighted)", "slim r0.1 a4": "slim r0.1 a4 (act_weighted)"}
    runs = []
    for case in args.cases:
        runs.append((case, case, refq_kw[case]))
        if case in variants:
            m, kw = refq_kw[case]
            runs.append((variants[case], case, (m, dict(kw, act_weighted=True))))
    refq.quantize_weight(np.ones((4, 8), np.float32), np.eye(8), "slim", rank=1)   # numba warm-up
    refq.quantize_weight(np.ones((4, 8), np.float32), np.eye(8), "sparsegpt", bits=4)
    print(f"{'case':<18} {'layer':<22} {'loss refq':>11} {'loss official':>13} {'ratio':>7} "
          f"{'t refq':>7} {'t off':>7}", file=sys.stderr)
    rows = {}
    for label, case, (method, kw) in runs:
        for k in layer_keys(data):
            W = data["W_" + k].astype(np.float32)
            H = data["H_" + k].astype(np.float64)
            kw_k = dict(kw)
            if f"rank|{case}|{k}" in off.files:
                kw_k["rank"] = int(off[f"rank|{case}|{k}"])
            t0 = time.perf_counter()
            q = refq.quantize_weight(W, H, method, **kw_k)
            t_ref = time.perf_counter() - t0
            lr = refq.layer_loss(W, q.dequantize(), H)
            lo = refq.layer_loss(W, off[f"W|{case}|{k}"], H)
            t_off = float(off[f"time|{case}|{k}"])
            rows.setdefault(label, []).append((lr / lo, t_ref, t_off, q.bits_per_weight))
            print(f"{label:<18} {k:<22} {lr:>11.5g} {lo:>13.5g} {lr / lo:>7.4f} "
                  f"{t_ref:>7.2f} {t_off:>7.2f}", file=sys.stderr, flush=True)
    print("| case | layers | loss ratio refq/official (geomean) | best | worst | "
          "refq bits/weight (mean) | time refq (s) | time official (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, rs in rows.items():
        r = np.array([x[0] for x in rs])
        print(f"| {case} | {len(rs)} | {np.exp(np.mean(np.log(r))):.4f} | {r.min():.4f} | "
              f"{r.max():.4f} | {np.mean([x[3] for x in rs]):.3f} | {sum(x[1] for x in rs):.2f} | "
              f"{sum(x[2] for x in rs):.2f} |")


if __name__ == "__main__":
    main()
