"""Check that numba compiled the uniform kernels' inner loops to vector code.

    python benchmarks/check_kernels_asm.py [--bits 1,2,3,4,5,6,7,8]

For each width it runs the "cpu" and "cpu-int" kernels once on a 256x1024 weight
(groups of 128), then reads the assembly numba generated for the functions that
compute one block of LANES rows (refq.kernels.cpu._uniform_lanes: block_dot and
block_int; Dispatcher.inspect_asm) and counts vector instructions:
  float kernel: packed FMAs (vfmadd...ps on xmm/ymm/zmm registers)
  int16 kernel: int16 multiply-adds into int32 (vpmaddwd, or VNNI vpdpwssd); at
                1 bit a code is 0 or 1 and LLVM adds x under a bit mask instead
                (vpaddd ... {%k}: AVX-512 masked adds, or vpand + vpaddd on AVX2)
It exits 1 when a kernel has none (the loop fell back to scalar code: the speed
then drops 5-20x), or has no software prefetch (refq.kernels.cpu.prefetch, an
llvm.prefetch intrinsic: without it layers not in cache ran 1.5-2.4x slower). Verified with the versions in VERIFIED below; other numba /
llvmlite versions may vectorise differently, which is what this script is for.
"""
import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (numba, llvmlite) where every loop was seen vectorised, with the same counts (the
# range setup.py's install_requires allows)
VERIFIED = [("0.67.0", "0.49.0"), ("0.68.1", "0.50.0")]


def count(asm, pattern):
    return len(re.findall(pattern, asm))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bits", default="1,2,3,4,5,6,7,8")
    a = p.parse_args()
    import llvmlite
    import numba
    from refq.formats.uniform import UniformWeight
    from refq.kernels import matmul
    from refq.kernels.bench import cpu_info
    import refq.kernels.cpu as kc
    info = cpu_info()
    print(f"# {info['cpu']} | ISA: {info['isa']} | LLVM cpu {info['llvm_cpu']} | "
          f"numba {numba.__version__} llvmlite {llvmlite.__version__}")
    if (numba.__version__, llvmlite.__version__) not in VERIFIED:
        print("# note: verified with " + ", ".join(f"numba {a} / llvmlite {b}" for a, b in VERIFIED))
    rng = np.random.default_rng(0)
    ok = True
    for bits in [int(b) for b in a.bits.split(",")]:
        out, n, g = 256, 1024, 128
        G = n // g
        q = UniformWeight.from_codes(rng.integers(0, 2 ** bits, (out, n)), rng.random((out, G)) * 0.01,
                                     rng.integers(0, 2 ** bits, (out, G)), bits, g, False)
        x = rng.standard_normal((1, n)).astype(np.float32)
        matmul(q, x, "cpu")
        matmul(q, x, "cpu-int")
        st = kc._uniform_state(q)
        fns = kc._uniform_lanes(st["lanes"]["slot"], st["lanes"]["cpw"]).block_functions
        int_pat = r"(vpmaddwd|vpdpwssd)\s[^\n]*%[xyz]mm" if bits > 1 else r"vpaddd\s[^\n]*%[xyz]mm"
        for name, pat in (("float", r"vfmadd\w*ps\s[^\n]*%[xyz]mm"), ("int16", int_pat)):
            asm = "\n".join(fns[name].inspect_asm().values())
            c = count(asm, pat)
            width = "zmm" if count(asm, r"%zmm") else "ymm" if count(asm, r"%ymm") else "xmm"
            extra = f", VNNI vpdpwssd: {count(asm, 'vpdpwssd')}" if name == "int16" else ""
            extra += f", prefetches: {count(asm, r'prefetch')}"
            ok &= count(asm, r"prefetch") > 0
            what = "vector adds" if name == "int16" and bits == 1 else "vector multiply-adds"
            print(f"w{bits} {name:6s}: {c:3d} {what} ({width} registers{extra})")
            ok &= c > 0
    print("OK: every inner loop is vectorised" if ok else "FAIL: a kernel has no vector multiply-add")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
