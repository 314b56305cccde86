"""Check that numba compiled the uniform kernels' inner loops to vector code.

    python benchmarks/check_kernels_asm.py [--bits 2,3,4,8]

For each width it runs the "cpu" and "cpu-int" kernels once on a 256x1024 weight
(groups of 128), then reads the assembly numba generated for the per-row functions
(Dispatcher.inspect_asm) and counts vector instructions:
  float kernel: packed FMAs (vfmadd...ps on xmm/ymm/zmm registers)
  int16 kernel: int16 multiply-adds into int32 (vpmaddwd, or VNNI vpdpwssd)
It exits 1 when a kernel has none (the loop fell back to scalar code: the speed
then drops 5-20x). Verified with the versions in VERIFIED below; other numba /
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
    p.add_argument("--bits", default="2,3,4,8")
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
        fns = kc._uniform_units(bits, st["h"]).row_functions
        for name, pat in (("float", r"vfmadd\w*ps\s[^\n]*%[xyz]mm"), ("int16", r"(vpmaddwd|vpdpwssd)\s[^\n]*%[xyz]mm")):
            asm = "\n".join(fns[name].inspect_asm().values())
            c = count(asm, pat)
            width = "zmm" if count(asm, r"%zmm") else "ymm" if count(asm, r"%ymm") else "xmm"
            extra = f", VNNI vpdpwssd: {count(asm, 'vpdpwssd')}" if name == "int16" else ""
            print(f"w{bits} {name:6s}: {c:3d} vector multiply-adds ({width} registers{extra})")
            ok &= c > 0
    print("OK: every inner loop is vectorised" if ok else "FAIL: a kernel has no vector multiply-add")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
