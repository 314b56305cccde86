"""refq's AQLM CPU kernel vs the official AQLM numba kernel, side by side (issue #8).

    /tmp/tfenv/bin/python benchmarks/bench_aqlm_kernel_official.py \
        --official /tmp/scratch/aqlm_inf/numba_kernel.py [--shape 4096x4096] [--repeat 15]

The official kernel is Vahe1994/AQLM `inference_lib/src/aqlm/inference_kernels/
numba_kernel.py` (`numba_gemm_lut`), exported from the repository into a
scratch file outside this repo (git show HEAD:inference_lib/src/aqlm/
inference_kernels/numba_kernel.py > FILE) and imported from there; it needs
torch (the environment running this script must have torch, numba and
refq's requirements, with this repo on PYTHONPATH).

One random 2x8 g8 weight (codes uniform, codebooks and scales random) is
handed to both in their own layouts: refq's AdditiveWeight keeps codes
(out, in/8, 2); the official kernel indexes codes (in/8, out, 2) as int8,
codebooks (2, 256, 1, 8) and scales (out, 1, 1, 1). Batch 1, float32. Each
repetition times one whole call of each, from the user's input to the output
(refq: `q.matmul(x)`; official: `numba_gemm_lut(x, ...)`), interleaved with
numpy's fp32 GEMV on the dense weight; medians are reported.

Without torch (this machine's environment has none, and the PyPI wheel brings
GBs of CUDA libraries), `--torch-stand-in` puts a minimal numpy-backed `torch`
module in place before the official file is loaded: the few names the official
wrapper touches (dtypes, from_numpy, empty, as_tensor, .numpy(), .view(dtype))
over numpy arrays. The official numba function itself runs unchanged; only its
thin torch wrapper is served by numpy, whose per-call cost (one allocation, one
row copy) is microseconds against the milliseconds timed.

It also checks each output against x @ W_hat.T in float64: the official kernel
parallelises over input groups and adds into one output vector from several
threads (`output_vec[i] += ...` inside `prange(num_input_groups)`), a race
that can lose updates when numba runs it on more than one thread.
"""
import argparse
import importlib.util
import os
import platform
import sys
import time

import numpy as np


def torch_stand_in():
    """A module named torch with just what the official numba_kernel.py's wrapper uses,
    over numpy arrays (see the module docstring)."""
    import types
    torch = types.ModuleType("torch")

    class Tensor(np.ndarray):
        device = "cpu"

        def numpy(self):
            return np.asarray(self)

        def view(self, dtype=None):
            return np.asarray(self).view(dtype).view(Tensor)

    torch.Tensor = torch.IntTensor = Tensor
    torch.int8, torch.uint8, torch.float32 = np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.float32)
    torch.from_numpy = lambda a: np.asarray(a).view(Tensor)
    torch.as_tensor = lambda a: np.asarray(a).view(Tensor)
    torch.empty = lambda *shape, device=None, dtype=None: np.empty(shape, dtype).view(Tensor)
    torch.__version__ = "numpy stand-in"
    sys.modules["torch"] = torch
    return torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="path of the exported numba_kernel.py")
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-stand-in", action="store_true",
                    help="serve the official wrapper's few torch calls from numpy (no torch installed)")
    a = ap.parse_args()
    import numba
    if a.torch_stand_in:
        torch = torch_stand_in()
    else:
        import torch

    from refq.formats.additive import AdditiveWeight
    spec = importlib.util.spec_from_file_location("aqlm_numba_kernel", a.official)
    off = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(off)

    out, n = (int(v) for v in a.shape.lower().split("x"))
    M, B, g = 2, 8, 8
    rng = np.random.default_rng(a.seed)
    codes = rng.integers(0, 2 ** B, (out, n // g, M), dtype=np.uint8)
    q = AdditiveWeight.from_arrays(codes, rng.standard_normal((M, 2 ** B, g)) * 0.02,
                                   rng.random(out) + 0.5, g)
    W_hat = q.dequantize()
    W = np.ascontiguousarray(W_hat, dtype=np.float32)
    x = rng.standard_normal((1, n)).astype(np.float32)

    # the official layouts, from the same stored values
    t_codes = torch.from_numpy(np.ascontiguousarray(codes.transpose(1, 0, 2))).view(torch.int8)
    t_cb = torch.from_numpy(np.asarray(q.codebooks, np.float32).reshape(M, 2 ** B, 1, g).copy())
    t_s = torch.from_numpy(np.asarray(q.scales, np.float32).reshape(out, 1, 1, 1).copy())
    t_x = torch.from_numpy(x)

    ref = x.astype(np.float64) @ W_hat.astype(np.float64).T
    scale = np.abs(ref).max()

    def official():
        return off.numba_gemm_lut(t_x, t_codes, t_cb, t_s, None).numpy()

    def refq():
        return q.matmul(x)

    err_off = np.abs(official() - ref).max() / scale      # also compiles
    err_refq = np.abs(refq() - ref).max() / scale
    times = {"refq": [], "official": [], "gemv": []}
    for _ in range(a.repeat):
        for name, fn in (("refq", refq), ("official", official), ("gemv", lambda: x @ W.T)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    threads = numba.get_num_threads()
    for what, f in (("median", np.median), ("min", np.min)):
        med = {k: float(f(v)) * 1e3 for k, v in times.items()}
        print(f"| {a.shape} | {threads} | {what} | {med['refq']:.2f} | {med['official']:.2f} | "
              f"{med['official'] / med['refq']:.2f}x | {med['gemv']:.2f} | "
              f"{med['gemv'] / med['refq']:.2f}x | {err_refq:.1e} | {err_off:.1e} |")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, numba {numba.__version__}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", file=sys.stderr)


if __name__ == "__main__":
    main()
