"""`refq bench kernels`: time y = x Ŵᵀ per format and shape, with yardsticks.

For every (format, shape, batch) it reports the median time of one product
(after a warm-up call that also compiles), the effective bandwidth on the
COMPRESSED bytes (every stored tensor of the weight, read once per product),
and, measured in the same run and interleaved with the kernel's repetitions
so that a busy machine slows both alike:
  * the numpy float32 BLAS product x @ W.T with a dense (out, in) weight;
  * a memory-copy bandwidth (np.copyto of 64 MiB, counting read + write).
The weights are random (codes uniform over their range), so the numbers
measure the kernels, not a model. Both the median and the minimum of the
repetitions are reported: on a shared machine the minimum is the better
estimate of what the code can do, and the ratio of two minima measured in
the same run the better estimate of a speed-up.

The first lines printed name the CPU and the vector instructions the kernels
are compiled for (LLVM's host CPU features as numba sees them: AVX2,
AVX-512, VNNI), the load average and the numba / llvmlite versions.
"""
import json
import os
import re
import sys
import time

import numpy as np

from refq.errors import RefqError
from refq.machine import cpu_model

SHAPES = ("576x576", "1536x576", "576x1536", "4096x4096", "11008x4096", "4096x11008")
FORMATS = {
    # name: description. Any uniform-wBgG, uniform-wBrow (one group per row) with an
    # optional "-act" (act-order permutation stored) is accepted too.
    "uniform-w2g128": "RTN/GPTQ 2-bit, groups of 128",
    "uniform-w3g128": "RTN/GPTQ 3-bit, groups of 128",
    "uniform-w4g128": "RTN/GPTQ 4-bit, groups of 128",
    "codebook-w2": "CLAQ 2-bit per-column codebooks",
    "codebook-w4": "CLAQ 4-bit per-column codebooks",
    "additive-2x8": "AQLM 2 codebooks x 8 bits, groups of 8",
    "additive-1x16": "AQLM 1 codebook x 16 bits, groups of 8 (the direct kernel)",
    "row_lut-w3": "SqueezeLLM 3-bit per-row tables",
    "row_lut-w4": "SqueezeLLM 4-bit per-row tables",
    # also any row_lut-wB and codebook-wB (B = 1..8)
}


_UNIFORM = re.compile(r"uniform-w([1-8])(?:g([1-9][0-9]*)|(row))(-act)?$")


def check_format(fmt):
    if fmt not in FORMATS and not _UNIFORM.match(fmt) and not re.match(r"(row_lut|codebook)-w[1-8]$", fmt):
        raise RefqError(f"--format {fmt}: unknown (known: {', '.join(FORMATS)}, "
                        "or uniform-wBgG / uniform-wBrow with an optional -act, row_lut-wB, codebook-wB)")


def build(fmt, rng, out, n):
    check_format(fmt)
    m = _UNIFORM.match(fmt)
    if m:
        from refq.formats.uniform import UniformWeight
        bits = int(m.group(1))
        g = None if m.group(3) else int(m.group(2))
        G = -(-n // (g or n))
        perm = rng.permutation(n) if m.group(4) else None
        return UniformWeight.from_codes(rng.integers(0, 2 ** bits, (out, n), dtype=np.uint8),
                                        rng.random((out, G)) * 0.01,
                                        rng.integers(0, 2 ** bits, (out, G)), bits, g, False, perm)
    if fmt.startswith("codebook-w"):
        from refq.formats.codebook import CodebookWeight
        bits = int(fmt[len("codebook-w")])
        cents = np.sort(rng.standard_normal((n, 2 ** bits)), axis=1) * 0.02
        return CodebookWeight.from_codes(rng.integers(0, 2 ** bits, (out, n), dtype=np.uint8),
                                         list(cents), np.full(n, bits, np.uint8))
    if fmt.startswith("additive-"):
        from refq.formats.additive import AdditiveWeight
        M, B = (int(v) for v in fmt[len("additive-"):].split("x"))
        return AdditiveWeight.from_arrays(rng.integers(0, 2 ** B, (out, n // 8, M)),
                                          rng.standard_normal((M, 2 ** B, 8)) * 0.02,
                                          rng.random(out) + 0.5, B)
    if fmt.startswith("row_lut-w"):
        from refq.formats.row_lut import RowLutWeight
        bits = int(fmt[len("row_lut-w"):])
        return RowLutWeight.from_codes(rng.integers(0, 2 ** bits, (out, n), dtype=np.uint8),
                                       np.sort(rng.standard_normal((out, 2 ** bits)), axis=1) * 0.02, bits)
    raise AssertionError(fmt)


def cpu_info():
    """{"cpu": model name, "isa": vector extensions the kernels are compiled for,
    "llvm_cpu": LLVM's name for the host, "numba", "llvmlite", "load"}."""
    import llvmlite
    import llvmlite.binding as ll
    import numba
    model = cpu_model()
    try:
        feats = {k for k, v in ll.get_host_cpu_features().items() if v}
        llvm_cpu = ll.get_host_cpu_name()
    except Exception:                    # noqa: BLE001  (an old llvmlite: report what is known)
        feats, llvm_cpu = set(), "unknown"
    isa = [name for name, flag in (("AVX2", "avx2"), ("FMA", "fma"), ("AVX-512F", "avx512f"),
                                   ("AVX-512BW", "avx512bw"), ("AVX512-VNNI", "avx512vnni"),
                                   ("AVX-VNNI", "avxvnni"), ("AMX-INT8", "amx-int8")) if flag in feats]
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unknown"
    return {"cpu": model, "isa": " ".join(isa) or "none of AVX2/AVX-512", "llvm_cpu": llvm_cpu,
            "numba": numba.__version__, "llvmlite": llvmlite.__version__, "load": load}


def parse_shape(s):
    try:
        o, i = s.lower().split("x")
        o, i = int(o), int(i)
        assert o > 0 and i > 0
    except (ValueError, AssertionError):
        raise RefqError(f"--shape {s!r}: expected OUTxIN, e.g. 4096x4096") from None
    return o, i


def copy_bandwidth(src, dst):
    t = time.perf_counter()
    np.copyto(dst, src)
    return 2 * src.nbytes / (time.perf_counter() - t) / 1e9


def bench_one(q, W, x, kernel, repeat):
    """Median seconds of kernel and of BLAS, interleaved, plus median copy GB/s.

    With kernel "gpu" the input lives on the GPU (a CuPy array) and each timed
    product ends with a device synchronisation, so no transfer is counted; the
    yardsticks stay the CPU ones (numpy BLAS, host copy).
    """
    xk, sync = x, (lambda: None)
    if kernel == "gpu":
        import cupy
        xk = cupy.asarray(x)
        sync = cupy.cuda.Device().synchronize
    q.matmul(xk, kernel=kernel)                              # warm-up / compile
    sync()
    _ = x @ W.T
    src = np.ones(1 << 24, np.float32)
    dst = np.empty_like(src)
    tk, tb, cp = [], [], []

    def kern():
        q.matmul(xk, kernel=kernel)
        sync()

    def blas():
        _ = x @ W.T

    for i in range(repeat):
        # The 64 MiB copy leaves L2 full of dirty lines that whatever runs next pays to
        # write back (a row_lut 4-bit product measured 2.8 ms after the GEMV, 5.2 ms
        # after the copy): kernel and BLAS take turns running first after it.
        cp.append(copy_bandwidth(src, dst))
        for fn, times in ((kern, tk), (blas, tb)) if i % 2 == 0 else ((blas, tb), (kern, tk)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return (float(np.median(tk)), float(np.median(tb)), float(np.median(cp)),
            float(min(tk)), float(min(tb)), float(max(cp)))


def run(formats, shapes, batches, kernel="cpu", repeat=7, seed=0, log=None):
    import numba
    rng = np.random.default_rng(seed)
    rows = []
    for shape in shapes:
        out, n = parse_shape(shape)
        W = rng.standard_normal((out, n), dtype=np.float32)
        for fmt in formats:
            q = build(fmt, rng, out, n)
            nbytes = sum(int(t.nbytes) for t in q.tensors().values())
            for T in batches:
                x = rng.standard_normal((T, n), dtype=np.float32)
                tk, tb, cp, tk_min, tb_min, cp_max = bench_one(q, W, x, kernel, repeat)
                sig = lambda v: float(f"{v:.4g}")              # noqa: E731
                r = {"format": fmt, "shape": f"{out}x{n}", "batch": T, "kernel": kernel,
                     "bits_per_weight": round(q.bits_per_weight, 4),
                     "compressed_mb": round(nbytes / 1e6, 3),
                     "ms": sig(tk * 1e3), "gbps": sig(nbytes / tk / 1e9),
                     "blas_fp32_ms": sig(tb * 1e3),
                     "blas_fp32_gbps": sig(W.nbytes / tb / 1e9),
                     "speedup_vs_blas": sig(tb / tk),
                     "copy_gbps": sig(cp),
                     "fraction_of_copy": sig(nbytes / tk / 1e9 / cp),
                     "ms_min": sig(tk_min * 1e3), "blas_fp32_ms_min": sig(tb_min * 1e3),
                     "speedup_vs_blas_min": sig(tb_min / tk_min), "copy_gbps_max": sig(cp_max)}
                rows.append(r)
                if log:
                    log(f"{fmt:15s} {r['shape']:>11s} T={T:<3d} {r['ms']:9.3f} ms "
                        f"{r['gbps']:7.2f} GB/s packed, copy {r['copy_gbps']:5.1f} GB/s "
                        f"({r['fraction_of_copy']:.2f} of it) | "
                        f"fp32 BLAS {r['blas_fp32_ms']:8.3f} ms -> x{r['speedup_vs_blas']:.2f} "
                        f"(min: {r['ms_min']:.3f} vs {r['blas_fp32_ms_min']:.3f} ms -> "
                        f"x{r['speedup_vs_blas_min']:.2f})")
    return {"threads": numba.get_num_threads(), **cpu_info(), "rows": rows}


def add_commands(sub):
    s = sub.add_parser("bench", help="benchmarks (bench kernels: matmul kernels per format)")
    bs = s.add_subparsers(dest="bench_what", metavar="WHAT", parser_class=type(s))
    bs.required = True
    k = bs.add_parser("kernels", help="time the matmul kernels per format and shape")
    k.add_argument("--format", action="append",
                   help="format to time (repeatable; default: " + ", ".join(FORMATS)
                   + "; also any uniform-wBgG or uniform-wBrow, optionally with -act)")
    k.add_argument("--shape", action="append", help="OUTxIN (repeatable; default: "
                   + ", ".join(SHAPES) + ")")
    k.add_argument("--batch", default="1", help="tokens per product, or a comma list (default 1)")
    k.add_argument("--kernel", choices=("cpu", "cpu-int", "gpu", "dequant"), default="cpu")
    k.add_argument("--repeat", type=int, default=7, help="timed repetitions (median; default 7)")
    k.add_argument("--json", action="store_true", help="print the results as one JSON object")
    k.set_defaults(func=cmd_bench_kernels)


def cmd_bench_kernels(args):
    from refq.kernels import check_kernel
    check_kernel(args.kernel)
    try:
        batches = [int(b) for b in str(args.batch).split(",")]
    except ValueError:
        raise RefqError(f"--batch {args.batch!r}: expected a positive integer or a comma list") from None
    if not batches or min(batches) < 1:
        raise RefqError(f"--batch {args.batch!r}: must be >= 1")
    if args.repeat < 1:
        raise RefqError(f"--repeat {args.repeat}: must be >= 1")
    shapes = args.shape or list(SHAPES)
    for s in shapes:
        parse_shape(s)
    for f in args.format or []:
        check_format(f)
    log = lambda m: print(m, file=sys.stderr, flush=True)      # noqa: E731
    import numba
    info = cpu_info()
    log(f"# {info['cpu']} | ISA: {info['isa']} (LLVM host cpu {info['llvm_cpu']}) | "
        f"{numba.get_num_threads()} numba threads | numba {info['numba']}, llvmlite {info['llvmlite']} "
        f"| load average {info['load']}")
    res = run(args.format or list(FORMATS), shapes, batches, args.kernel, args.repeat, log=log)
    if args.json:
        print(json.dumps(res))
    return 0
