"""How much a batch-1 product depends on what ran just before it (issue #20).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        python benchmarks/bench_kernels_cache_state.py --format uniform-w4g128 --format row_lut-w4 \
        [--shape 4096x4096] [--repeat 9]

`refq bench kernels` interleaves each product with numpy's fp32 GEMV and a 64 MiB copy
(the bandwidth yardstick), so a kernel may run right after the copy. This script times
the same product (minimum of --repeat) three ways: back to back ("warm": the packed
weight stays in the caches it fits in), each time after the 64 MiB copy ("after copy":
L2 full of the copy's dirty lines), and each time after the fp32 GEMV of a dense weight
of the same shape ("after GEMV"). Formats are those of `refq bench kernels --format`;
the format "numpy" times the fp32 GEMV itself (its "after GEMV" is back to back).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from refq.kernels.bench import build, check_format, copy_bandwidth, cpu_info, parse_shape  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--format", action="append", required=True, help="a refq bench kernels format, or numpy")
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--repeat", type=int, default=9)
    a = p.parse_args()
    for f in a.format:
        if f != "numpy":
            check_format(f)
    info = cpu_info()
    print(f"# {info['cpu']} | ISA: {info['isa']} | numba {info['numba']} | load average {info['load']}")
    out, n = parse_shape(a.shape)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((out, n), dtype=np.float32)
    x = rng.standard_normal((1, n), dtype=np.float32)
    src = np.ones(1 << 24, np.float32)
    dst = np.empty_like(src)
    before = {"warm": lambda: None, "after copy": lambda: copy_bandwidth(src, dst),
              "after GEMV": lambda: x @ W.T}
    for fmt in a.format:
        if fmt == "numpy":
            product = lambda: x @ W.T                 # noqa: E731
        else:
            q = build(fmt, rng, out, n)
            product = lambda: q.matmul(x)             # noqa: E731
        product()                                     # compile / warm up
        cells = []
        for name, fn in before.items():
            ts = []
            for _ in range(a.repeat):
                fn()
                t = time.perf_counter()
                product()
                ts.append(time.perf_counter() - t)
            cells.append(f"{name} {min(ts) * 1e3:6.2f} ms")
        print(f"{fmt:16s} {a.shape}: " + " | ".join(cells), flush=True)
    print(f"# load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
