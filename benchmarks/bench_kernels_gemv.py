"""Batch-1 GEMV: uniform kernels ("cpu" exact, "cpu-int" int16 activations) vs numpy fp32.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        python benchmarks/bench_kernels_gemv.py --shape 4096x4096 --bits 2,3,4,8 --group 128 \
        [--act both] [--repeat 15] [--rounds 3] [--json]

For every (shape, bits, group, act-order) a random uniform weight (codes uniform
over their range) is timed through refq.kernels.matmul with each --kernels entry,
interleaved with the numpy fp32 product x @ W.T of a dense weight of the same
shape, so a busy machine slows all alike. A 64 MiB copy (the bandwidth
yardstick) runs before EVERY timed product, so each starts with the caches as
a decoding step finds them, holding other layers' data: without it the second
kernel of a pair found the weight the first had just read in cache (the "cpu"
and "cpu-int" kernels share their repacked codes) and small layers found the
Python and numba call path warm. --rounds repeats the whole sweep; the MINIMUM over all repetitions of
all rounds is reported (on a shared machine the minimum is the best estimate of
what the code can do), with speed-ups as ratios of minima from the same run.
The first line names the CPU, the ISA numba compiles for, the thread counts and
the load average (refq.kernels.bench.cpu_info).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from refq.formats.uniform import UniformWeight  # noqa: E402
from refq.kernels import matmul  # noqa: E402
from refq.kernels.bench import copy_bandwidth, cpu_info, parse_shape  # noqa: E402


def build(rng, out, n, bits, g, act):
    G = -(-n // (g or n))
    return UniformWeight.from_codes(rng.integers(0, 2 ** bits, (out, n), dtype=np.uint8),
                                    rng.random((out, G)) * 0.01, rng.integers(0, 2 ** bits, (out, G)),
                                    bits, g, False, rng.permutation(n) if act else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", action="append", default=None)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--group", default="128", help="comma list; 'row' = one group per row")
    p.add_argument("--act", choices=("off", "on", "both"), default="off")
    p.add_argument("--kernels", default="cpu,cpu-int")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    import numba
    info = cpu_info()
    print(f"# {info['cpu']} | ISA: {info['isa']} | numba {info['numba']} llvmlite {info['llvmlite']} | "
          f"{numba.get_num_threads()} numba threads, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} "
          f"| load average {info['load']}", flush=True)
    kernels = a.kernels.split(",")
    acts = {"off": [False], "on": [True], "both": [False, True]}[a.act]
    rng = np.random.default_rng(0)
    src = np.ones(1 << 24, np.float32)
    dst = np.empty_like(src)
    configs = []
    for shape in a.shape or ["4096x4096"]:
        out, n = parse_shape(shape)
        W = rng.standard_normal((out, n), dtype=np.float32)
        x = rng.standard_normal((1, n), dtype=np.float32)
        for bits in [int(b) for b in a.bits.split(",")]:
            for gs in a.group.split(","):
                for act in acts:
                    g = None if gs == "row" else int(gs)
                    if act and g is None:
                        continue            # act-order stores a perm only with groups
                    q = build(rng, out, n, bits, g, act)
                    for k in kernels:
                        matmul(q, x, k)     # compile / warm up
                    configs.append({"shape": shape, "bits": bits, "group": gs, "act": act, "q": q,
                                    "W": W, "x": x, "t": {k: [] for k in kernels + ["numpy"]},
                                    "copy": []})
    for _ in range(a.rounds):
        for c in configs:
            for _ in range(a.repeat):
                for k in kernels:
                    c["copy"].append(copy_bandwidth(src, dst))
                    t = time.perf_counter()
                    matmul(c["q"], c["x"], k)
                    c["t"][k].append(time.perf_counter() - t)
                c["copy"].append(copy_bandwidth(src, dst))
                t = time.perf_counter()
                _ = c["x"] @ c["W"].T
                c["t"]["numpy"].append(time.perf_counter() - t)
    rows = []
    for c in configs:
        q = c["q"]
        nbytes = sum(int(t.nbytes) for t in q.tensors().values())
        tn = min(c["t"]["numpy"])
        cp = max(c["copy"])
        r = {"shape": c["shape"], "bits": c["bits"], "group": c["group"], "act_order": c["act"],
             "numpy_fp32_ms": round(tn * 1e3, 4), "copy_gbps": round(cp, 2)}
        line = f"{c['shape']:>10s} w{c['bits']} g{c['group']:<4s} act={int(c['act'])}  numpy {tn * 1e3:7.3f} ms"
        for k in kernels:
            tk = min(c["t"][k])
            r[f"{k}_ms"] = round(tk * 1e3, 4)
            r[f"{k}_speedup"] = round(tn / tk, 3)
            r[f"{k}_gbps"] = round(nbytes / tk / 1e9, 3)
            r[f"{k}_fraction_of_copy"] = round(nbytes / tk / 1e9 / cp, 3)
            line += f" | {k} {tk * 1e3:7.3f} ms x{tn / tk:5.2f} ({nbytes / tk / 1e9:5.2f} GB/s, {nbytes / tk / 1e9 / cp:.2f} of copy)"
        print(line + f" | copy {cp:.1f} GB/s", flush=True)
        rows.append(r)
    try:
        info["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    print(f"# load average at the end: {info.get('load_after')}", flush=True)
    if a.json:
        print(json.dumps({**info, "threads": numba.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
