"""CPU kernels (numba): y = x Ŵᵀ straight from the packed tensors.

This file is PERFORMANCE code: it computes exactly what `x @ q.dequantize().T`
computes, rearranged so that a batch-1 product reads each packed byte once and
never builds the float weight. To learn what a format MEANS, read its
dequantize() in refq/formats/ (uniform.py, codebook.py, additive.py,
row_lut.py, spqr.py, outliers.py): a few lines of numpy each. Come back here to
see how the same sum is reordered (sums per group, bit planes, lookup tables)
to run near the memory bandwidth. tests/test_kernels_cpu.py checks every
kernel against dequantize().

Every kernel is parallel over OUTPUT ROWS (`prange` over rows or blocks of
rows): each y[t, r] is written by the one thread that owns row r and is
summed in an order fixed by the code, so 1 and N threads give bit-identical
results (tests/test_kernels_cpu.py checks it). The official AQLM numba kernel
parallelises over input groups and races on `out[i] +=`; none of these does.

fastmath: the hot float loops use only {"reassoc", "contract"} so that LLVM
may vectorise the dot products (8 float lanes on AVX2, 16 on AVX-512) and
fuse multiply-adds; without them the loops stay scalar (5-10x slower). The
summation order is then fixed by the compiled code, not by the thread count:
results are deterministic on one machine, and may differ in the last bits
between CPUs with different vector widths. NaN/Inf semantics are kept.

Two kernel variants for the uniform formats (refq.kernels.matmul's `kernel`):
  "cpu"      exact: float32 activations, within ~1e-6 relative of
             x @ dequantize().T (the default);
  "cpu-int"  x rounded per block of <= 128 stored columns to int16 with one
             scale per block; each block's dot product with the codes is an
             int32 multiply-add (vpmaddwd / VNNI vpdpwssd), float work once per
             block and per group. Not exact: uniform_int_cpu states the error
             bound (activation rounding x weight magnitudes). Its integer sums
             are exact in any order, so it needs no fastmath at all.
benchmarks/check_kernels_asm.py checks that both are compiled to vector
multiply-adds.

Formats and their kernels (x (T, in) float32, T small; y (T, out)):

uniform, uniform_sparse (RTN, GPTQ, QuantEase)
    W_hat[r, c] = s[r, g(c)] (q[r, c] - z[r, g(c)]), so
        y[t, r] = Σ_g s[r, g] (Σ_{c in g} q[r, c] x[t, c]  -  z[r, g] X[t, g])
    with X[t, g] = Σ_{c in g} x[t, c] computed once per token. A packed row is
    read in UNITS, the fewest whole bytes that hold whole codes (unit_geometry:
    1 byte = 8/4/2/1 codes at 1/2/4/8 bits, 3 bytes = 8 codes at 3 bits, 4 at 6
    bits, 5 bytes = 8 codes at 5 bits, 7 bytes = 8 at 7 bits): unit u, read as
    one little-endian integer v, holds the codes of stored columns
    u*cpu .. u*cpu+cpu-1 (cpu = codes per unit, least significant first). x is
    split once per call into cpu planes xp[t, p, u] = x[t, u*cpu + p] and the
    inner loop is
        a += float(v >> (bits*p) & mask) * xp[t, p, u]
    over the units of one group, a loop whose length is a compile-time
    constant (a closure constant: one kernel per (bits, units per group)),
    which LLVM unrolls and vectorises; tokens go four at a time so each unit is
    decoded once per four dot products. This needs groups that start on a
    unit (g a multiple of cpu: any g % 8 == 0 works for every width) or one
    group per row; other group sizes use the bit-extraction kernel (any
    layout, ~10-30x slower: it was the only 3-bit path before, 0.09x the
    fp32 GEMV). With act-order `perm`, x is permuted into stored order first
    (x[:, perm]). Batches from 6 (<= 2 bits) or 12 tokens
    (refq.kernels.BLAS_MIN_BATCH): dequantize tiles of rows with
    `uniform_rows` and multiply by BLAS. `uniform_sparse` adds the CSR
    outliers (below).

codebook (CLAQ: one codebook per column, mixed widths)
    LUT[t, c, k] = x[t, c] · C_c[k]; y[t, r] = Σ_b Σ_{c of width b} LUT[t, c, code[r, c]]
    (widths ascending, columns ascending), then + CSR outliers. For 1 and 2
    bits (and 4 bits on layers of >= 2048 rows, BYTE_TABLE_MIN_OUT) the LUT is
    folded once per call into a table per BYTE of codes, BT[t, i, v] =
    Σ_p LUT[t, i*cpb + p, digit p of v] (256 entries per byte position), so a
    row costs one lookup per byte (4 codes at 2 bits) instead of one per code;
    otherwise one lookup per code (bytes walked at 4 and 8 bits, each code
    extracted at 3, 5, 6, 7). Large batches: `codebook_rows` decodes tiles of
    rows for BLAS.

additive (AQLM)
    LUT[t, k, m, j] = x[t, k-th group] · C_m[j]  (a small GEMM per token);
    y[t, r] = s[r] Σ_k Σ_m LUT[t, k, m, code[r, k, m]], groups outer and rows
    inner over a group-major copy of the codes, so one group's table stays in L1.

spqr: the uniform kernels, with the bilevel scales/zeros decoded once to float32.

row_lut (SqueezeLLM: one table per output row)
    y[t, r] = Σ_v lut[r, v] Σ_{c: code[r, c] = v} x[t, c]   (bucket sums, then a dot).

CSR outliers (refq.formats.outliers): y[t, r] += Σ_e S_val[e] x[t, S_col[e]]
    over row r's entries, ascending, after the dense part.
"""
import numba
import numpy as np
from numba import njit, prange

from refq.errors import RefqError
from refq.kernels import register

_FM = {"reassoc", "contract"}
ROW_BLOCK = 16          # rows per prange item in the small-batch kernels


# Below this many multiply-adds a product runs a serial twin of its kernel:
# launching a parallel region costs ~10-50 us on a quiet machine, and on a
# loaded one (the 2-core development machine shared by several jobs) it waits
# for every worker thread to be scheduled, which made a SmolLM2 decode step
# (210 products of ~1M weights) 15x slower. The choice depends only on the
# shape and batch, never on the thread count, so results stay bit-identical
# across thread counts.
PAR_MIN_WORK = 1 << 21
_SERIAL = {}


def _run(kernel, work, *args):
    """kernel(*args), or its serial twin when work < PAR_MIN_WORK."""
    if work >= PAR_MIN_WORK:
        return kernel(*args)
    twin = _SERIAL.get(id(kernel))
    if twin is None:
        twin = _SERIAL[id(kernel)] = (kernel, njit(fastmath=_FM)(kernel.py_func))
    return twin[1](*args)


def _cached(q, key, build):
    """Per-weight state derived from its tensors, rebuilt when one is replaced."""
    st = q.__dict__.get("_kstate")
    if st is not None and len(st[0]) == len(key) and all(a is b for a, b in zip(st[0], key)):
        return st[1]
    v = build()
    q._kstate = (key, v)
    return v


# =========================================================================== CSR outliers
@njit(cache=True, parallel=True)
def _csr_add(y, x, rowptr, cols, vals):
    """y (T, out) += x (T, in) Sᵀ, S in CSR (rowptr (out+1,), cols (nnz,), vals (nnz,) f32)."""
    out = rowptr.shape[0] - 1
    T = x.shape[0]
    for r in prange(out):
        e0, e1 = rowptr[r], rowptr[r + 1]
        if e1 > e0:
            for t in range(T):
                a = np.float32(0.0)
                for e in range(e0, e1):
                    a += vals[e] * x[t, cols[e]]
                y[t, r] += a


@njit(cache=True, parallel=True)
def _csr_add_rows(W, r0, rowptr, cols, vals):
    """W (r1-r0, in) += S[r0:r1] (dense rows of the BLAS path)."""
    for i in prange(W.shape[0]):
        r = r0 + i
        for e in range(rowptr[r], rowptr[r + 1]):
            W[i, cols[e]] += vals[e]


def csr_state(csr):
    """(rowptr, cols, vals f32) of a refq.formats.outliers.CSR, or None when empty."""
    if csr is None or csr.nnz == 0:
        return None
    return (np.ascontiguousarray(csr.rowptr), np.ascontiguousarray(csr.cols),
            np.ascontiguousarray(csr.values, dtype=np.float32))


def add_outliers(y, x2, st):
    if st is not None:
        _run(_csr_add, x2.shape[0] * x2.shape[1] * 4, y, x2, *st)
    return y


# =========================================================================== uniform
_UNIT_KERNELS = {}       # (bits, h) -> compiled kernel


def unit_geometry(bits):
    """(bytes, codes) of the smallest run of whole bytes holding whole codes.

    A packed row is a little-endian bitstream (refq.formats.packing), so every
    lcm(bits, 8) bits the codes and the bytes line up again: 1 byte holds 8, 4, 2
    or 1 codes at 1, 2, 4 or 8 bits; 3 bytes hold 8 codes at 3 bits (4 at 6);
    5 bytes hold 8 codes at 5 bits, 7 bytes 8 codes at 7 bits. Code p of a unit is
    bits [bits*p, bits*(p+1)) of the unit's bytes read as one little-endian integer.
    """
    L = bits * 8 // np.gcd(bits, 8)
    return L // 8, L // bits


INT_BLOCK = 128         # most columns per int16 activation block (int32 cannot overflow)


def int_block_units(h, cpu):
    """Units per activation block of the integer kernel: the largest divisor of the
    group's h units that spans at most INT_BLOCK columns, so blocks never straddle
    a weight group and 255 * 32767 * INT_BLOCK < 2^31."""
    return max(d for d in range(1, h + 1) if h % d == 0 and d * cpu <= INT_BLOCK) \
        if cpu <= INT_BLOCK else 1


def _uniform_units(bits, h):
    """The kernel for groups of h whole units (see unit_geometry), compiled once per (bits, h).

    bits and h are closure constants, so the group loops have compile-time trip
    counts that LLVM unrolls and vectorises (numba.literally arguments stay
    runtime values and ran ~30x slower). Numba cannot cache closures on disk:
    the first product of a new (bits, group size) compiles for a few seconds.

    The per-row work is a plain (serial) function called from the `prange` over
    blocks of rows: written inline in the parallel loop, the 3-byte word reads of
    3 bits were not vectorised (46 ms against 3.8 ms for 4096x4096, measured).

    kernel(qw, s, z, xp, xsum, y): qw (out, >= nu*ub) uint8; s, z (out, G) f32;
    xp (T, cpu, nu) f32 planes of x in stored column order, xp[t, p, u] =
    x[t, u*cpu + p] (zero past in); xsum (T, G) f32; y (T, out) f32 (written).
    """
    key = (bits, h)
    if key in _UNIT_KERNELS:
        return _UNIT_KERNELS[key]
    ub, cpu = unit_geometry(bits)
    mask = (1 << bits) - 1
    WT = np.int32 if ub <= 3 else np.int64          # a unit is <= 24 bits, or 40 / 56
    hb = int_block_units(h, cpu)                    # units per activation block (cpu-int)

    @njit(inline="always")
    def word(row, u):
        """Unit u of a packed row as one little-endian integer (ub bytes)."""
        i = u * ub
        v = WT(row[i])
        for j in range(1, ub):
            v |= WT(row[i + j]) << WT(8 * j)
        return v

    @njit(fastmath=_FM)
    def row_dot1(row, s, z, xp, xsum, t):
        """y[t, r] for one row: Σ_g s_g (Σ_{c in g} q_c x_c - z_g X_g)."""
        G = s.shape[0]
        nu = xp.shape[2]
        M = WT(mask)
        tot = np.float32(0.0)
        for gi in range(G):
            u0 = gi * h
            a = np.float32(0.0)
            if u0 + h <= nu and cpu == 2 and ub == 1:
                # 4 bits: one plane at a time, each its own vector chain (1.4x, measured)
                for p in range(cpu):
                    ap = np.float32(0.0)
                    for k in range(h):
                        ap += np.float32((word(row, u0 + k) >> WT(bits * p)) & M) * xp[t, p, u0 + k]
                    a += ap
            elif u0 + h <= nu:                  # full group: constant trip count
                for k in range(h):              # (planes inner: 2x faster at 2 bits)
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        a += np.float32((v >> WT(bits * p)) & M) * xp[t, p, u0 + k]
            else:                               # the last, shorter group
                for k in range(nu - u0):
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        a += np.float32((v >> WT(bits * p)) & M) * xp[t, p, u0 + k]
            tot += s[gi] * (a - z[gi] * xsum[t, gi])
        return tot

    @njit(fastmath=_FM)
    def row_dot4(row, s, z, xp, xsum, t):
        """y[t:t+4, r]: tokens four at a time, each code decoded once for four dot products."""
        G = s.shape[0]
        nu = xp.shape[2]
        M = WT(mask)
        y0 = np.float32(0.0)
        y1 = np.float32(0.0)
        y2 = np.float32(0.0)
        y3 = np.float32(0.0)
        for gi in range(G):
            u0 = gi * h
            hu = h if u0 + h <= nu else nu - u0
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            if hu == h:                         # full group: constant trip count
                for k in range(h):
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        c = np.float32((v >> WT(bits * p)) & M)
                        a0 += c * xp[t, p, u0 + k]
                        a1 += c * xp[t + 1, p, u0 + k]
                        a2 += c * xp[t + 2, p, u0 + k]
                        a3 += c * xp[t + 3, p, u0 + k]
            else:
                for k in range(hu):
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        c = np.float32((v >> WT(bits * p)) & M)
                        a0 += c * xp[t, p, u0 + k]
                        a1 += c * xp[t + 1, p, u0 + k]
                        a2 += c * xp[t + 2, p, u0 + k]
                        a3 += c * xp[t + 3, p, u0 + k]
            sc, zr = s[gi], z[gi]
            y0 += sc * (a0 - zr * xsum[t, gi])
            y1 += sc * (a1 - zr * xsum[t + 1, gi])
            y2 += sc * (a2 - zr * xsum[t + 2, gi])
            y3 += sc * (a3 - zr * xsum[t + 3, gi])
        return y0, y1, y2, y3

    @njit(parallel=True, fastmath=_FM)
    def kernel(qw, s, z, xp, xsum, y):
        out = qw.shape[0]
        T = xp.shape[0]
        T4 = T - T % 4
        nblk = (out + ROW_BLOCK - 1) // ROW_BLOCK
        for blk in prange(nblk):
            for r in range(blk * ROW_BLOCK, min(out, blk * ROW_BLOCK + ROW_BLOCK)):
                for t in range(0, T4, 4):
                    y[t, r], y[t + 1, r], y[t + 2, r], y[t + 3, r] = row_dot4(qw[r], s[r], z[r], xp, xsum, t)
                for t in range(T4, T):              # the remaining tokens one at a time
                    y[t, r] = row_dot1(qw[r], s[r], z[r], xp, xsum, t)

    @njit(parallel=True)
    def rows(qw, s, z, r0, r1, W):
        """W (r1-r0, nu*cpu) = W_hat[r0:r1] in STORED column order (padding columns too)."""
        G = s.shape[1]
        nu = W.shape[1] // cpu
        M = WT(mask)
        for i in prange(r1 - r0):
            r = r0 + i
            row = qw[r]
            for gi in range(G):
                u0 = gi * h
                sc, zr = s[r, gi], z[r, gi]
                for k in range(min(h, nu - u0)):
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        W[i, (u0 + k) * cpu + p] = sc * (np.float32((v >> WT(bits * p)) & M) - zr)

    nbg = h // hb                                   # activation blocks per weight group

    @njit
    def row_int(row, s, z, xq, sx, xtsum, t):
        """y[t, r] with int16 activations (the "cpu-int" variant, see uniform_int_cpu):
        per activation block b (hb units, never across a group) an exact int32 dot
        product Σ q_c xq_c, scaled once by the block's sx; at the end of each group
        y += s_g (Σ_b sx_b (Σ q xq) - z_g X̃_g).

        Every integer result is cast back to int32 (numba widens int arithmetic to
        int64, which LLVM then does not vectorise as well): |Σ q xq| <= 128 * 255 *
        32767 < 2^31, so nothing overflows. One flat loop over blocks: a loop over
        groups with the blocks nested inside ran 10-15x slower (not vectorised).
        """
        nu = xq.shape[2]
        nblk = sx.shape[1]
        M = WT(mask)
        tot = np.float32(0.0)
        acc = np.float32(0.0)
        for b in range(nblk):
            b0 = b * hb
            a = np.int32(0)
            if b0 + hb <= nu:                    # full block: constant trip count
                for k in range(hb):
                    v = word(row, b0 + k)
                    for p in range(cpu):
                        a = np.int32(a + np.int32((v >> WT(bits * p)) & M) * np.int32(xq[t, p, b0 + k]))
            else:                                # the row's last, shorter block
                for k in range(nu - b0):
                    v = word(row, b0 + k)
                    for p in range(cpu):
                        a = np.int32(a + np.int32((v >> WT(bits * p)) & M) * np.int32(xq[t, p, b0 + k]))
            acc += sx[t, b] * np.float32(a)
            if (b + 1) % nbg == 0 or b == nblk - 1:  # end of a group
                gi = b // nbg
                tot += s[gi] * (acc - z[gi] * xtsum[t, gi])
                acc = np.float32(0.0)
        return tot

    @njit(parallel=True)
    def kernel_int(qw, s, z, xq, sx, xtsum, y):
        """xq (T, cpu, nu) int16 planes; sx (T, nblocks) f32; xtsum (T, G) f32; y written."""
        out = qw.shape[0]
        T = xq.shape[0]
        nblk = (out + ROW_BLOCK - 1) // ROW_BLOCK
        for blk in prange(nblk):
            for r in range(blk * ROW_BLOCK, min(out, blk * ROW_BLOCK + ROW_BLOCK)):
                for t in range(T):
                    y[t, r] = row_int(qw[r], s[r], z[r], xq, sx, xtsum, t)

    kernel.rows = rows
    kernel.int16 = kernel_int
    kernel.block_units = hb
    kernel.row_functions = {"float": row_dot1, "float x4": row_dot4, "int16": row_int}  # asm checks
    _UNIT_KERNELS[key] = kernel
    return kernel


@njit(inline="always")
def _code_at(row, k, bits, M, nb):
    """Code k of a packed row (any width 1..8; may straddle two bytes)."""
    bit = k * bits
    i = bit >> 3
    v = np.int32(row[i])
    if i + 1 < nb:
        v |= np.int32(row[i + 1]) << np.int32(8)
    return (v >> np.int32(bit & 7)) & M


@njit(cache=True, parallel=True, fastmath=_FM)
def _uniform_bits(qw, s, z, x, xsum, y, bits, g):
    """Any width and group size: codes extracted one by one from the bitstream.

    x (T, in) in stored column order; xsum (T, G); y (T, out) written.
    """
    out, nb = qw.shape
    T, n = x.shape
    G = s.shape[1]
    M = np.int32((1 << bits) - 1)
    for r in prange(out):
        row = qw[r]
        for t in range(T):
            acc = np.float32(0.0)
            for gi in range(G):
                c0 = gi * g
                c1 = min(n, c0 + g)
                a = np.float32(0.0)
                for c in range(c0, c1):
                    a += np.float32(_code_at(row, c, bits, M, nb)) * x[t, c]
                acc += s[r, gi] * (a - z[r, gi] * xsum[t, gi])
            y[t, r] = acc


@njit(cache=True, parallel=True)
def _uniform_rows(qw, s, z, perm, r0, r1, bits, g, W):
    """W (r1-r0, in) = W_hat[r0:r1] in ORIGINAL column order (perm (in,) or empty)."""
    nb = qw.shape[1]
    n = W.shape[1]
    G = s.shape[1]
    M = np.int32((1 << bits) - 1)
    has_perm = perm.shape[0] > 0
    for i in prange(r1 - r0):
        r = r0 + i
        row = qw[r]
        for gi in range(G):
            sc, zr = s[r, gi], z[r, gi]
            for c in range(gi * g, min(n, gi * g + g)):
                v = sc * (np.float32(_code_at(row, c, bits, M, nb)) - zr)
                if has_perm:
                    W[i, perm[c]] = v
                else:
                    W[i, c] = v


def _uniform_like(q, qw, s, z, perm, bits, g, csr):
    """Kernel state. mode "units" (groups start on a unit boundary, or one group per
    row): qw padded with zero bytes to whole units when the row ends inside one (a
    copy, only for shapes where in * bits is not a multiple of 8 * unit bytes);
    otherwise mode "bits", the bit-extraction kernel."""
    out, n = q.shape
    ub, cpu = unit_geometry(bits)
    G = s.shape[1]
    nu = -(-n // cpu)                                   # units per row
    mode = "units" if g % cpu == 0 or G == 1 else "bits"
    qw = np.ascontiguousarray(qw)
    if mode == "units" and qw.shape[1] < nu * ub:
        qw = np.concatenate([qw, np.zeros((out, nu * ub - qw.shape[1]), np.uint8)], axis=1)
    return {
        "qw": qw,
        "s": np.ascontiguousarray(s, dtype=np.float32),                 # (out, G)
        "z": np.ascontiguousarray(z, dtype=np.float32),                 # (out, G)
        "perm": None if perm is None else np.asarray(perm).astype(np.int64),
        "iperm": None if perm is None else np.argsort(perm).astype(np.int64),   # its inverse
        "shape": (out, n), "g": g, "bits": bits, "cpu": cpu, "nu": nu, "mode": mode,
        "h": (g // cpu if G > 1 else nu) if mode == "units" else 0,     # units per group
        "csr": csr_state(csr),
    }


def _uniform_state(q):
    """Kernel state of a uniform-like weight: "uniform", "uniform_sparse", "spqr"."""
    if q.FORMAT == "spqr":
        # SpQR: the same dense layout; scales/zeros decoded (float32, as the format
        # defines them, zeros real-valued when bilevel) once per weight
        def build():
            q._validate()
            f = q.fields
            return _uniform_like(q, f["qweight"], q.scales(), q.zeros(), f.get("perm"), q.bits,
                                 q.group_size, q.outliers)
        return _cached(q, tuple(q.fields.values()) + (q.outliers,), build)

    def build():
        q._validate()                       # the format's own dtype/shape checks
        return _uniform_like(q, q.qweight, q.scales, q.zeros(), q.perm, q.bits,
                             q.group_size or q.shape[1], getattr(q, "outliers", None))
    key = (q.qweight, q.scales, q.qzeros, q.perm, getattr(q, "outliers", None))
    return _cached(q, key, build)


def _group_sums(xs, g, G):
    """(T, G) float32 sums of x over each group of g stored columns."""
    T, n = xs.shape
    pad = G * g - n
    if pad:
        xs = np.concatenate([xs, np.zeros((T, pad), np.float32)], axis=1)
    return np.ascontiguousarray(xs.reshape(T, G, g).sum(axis=2, dtype=np.float32))


@register("cpu", "uniform", "uniform_sparse", "spqr")
def uniform_cpu(q, x2):
    return uniform_apply(_uniform_state(q), x2)


def uniform_apply(st, x2):
    """uniform_cpu with the kernel state st: of one weight, or of weights stacked
    by rows (uniform_fuse)."""
    out, n = st["shape"]
    T = x2.shape[0]
    xs = x2 if st["perm"] is None else np.ascontiguousarray(x2[:, st["perm"]])
    G = st["s"].shape[1]
    xsum = _group_sums(xs, st["g"], G)
    y = np.empty((T, out), np.float32)
    if st["mode"] == "units":
        cpu, nu = st["cpu"], st["nu"]
        if nu * cpu != n:
            xs = np.concatenate([xs, np.zeros((T, nu * cpu - n), np.float32)], axis=1)
        xp = np.ascontiguousarray(xs.reshape(T, nu, cpu).transpose(0, 2, 1))   # (T, cpu, nu)
        _run(_uniform_units(st["bits"], st["h"]), T * out * n, st["qw"], st["s"], st["z"], xp, xsum, y)
    else:
        _run(_uniform_bits, T * out * n, st["qw"], st["s"], st["z"], xs, xsum, y, st["bits"], st["g"])
    return add_outliers(y, x2, st["csr"])


uniform_cpu.blas_min_batch = lambda q: 6 if q.bits <= 2 else 12     # measured crossover


def _stackable(sts):
    """Kernel states that one call can run stacked by rows (uniform_fuse)."""
    a = sts[0]
    same = ("bits", "g", "mode", "h", "nu", "cpu")
    for st in sts:
        if (any(st[k] != a[k] for k in same) or st["shape"][1] != a["shape"][1]
                or st["mode"] != "units" or st["csr"] is not None
                or (st["perm"] is None) != (a["perm"] is None)
                or (a["perm"] is not None and not np.array_equal(st["perm"], a["perm"]))):
            return False
    return True


@register("fuse", "uniform")
def uniform_fuse(qs, kernel):
    """x2 -> x2 [Ŵ_1; Ŵ_2; ...]ᵀ in one kernel call, for uniform weights that share
    their input (refq.kernels.fuse), or None. Every output row of the uniform
    kernels is summed on its own (the same unit loop, whatever rows surround it),
    so the stacked codes, scales and zeros give each weight's rows exactly as its
    own call does. Needs one layout (_stackable): the same bits, groups, unit loop
    and act-order permutation (GPTQ's q/k/v and gate/up share a Hessian, hence
    perm), and no outliers (their CSR is per weight)."""
    if not _stackable([_uniform_state(q) for q in qs]):
        return None
    apply = uniform_int_apply if kernel == "cpu-int" else uniform_apply
    built = [None]          # (member states, their stacked state or None), from the first call

    def fused(x2):
        now = [_uniform_state(q) for q in qs]
        b = built[0]
        if b is None or any(x is not y for x, y in zip(now, b[0])):     # a weight's tensors replaced
            st = None
            if _stackable(now):
                st = dict(now[0], shape=(sum(t["shape"][0] for t in now), now[0]["shape"][1]),
                          qw=np.concatenate([t["qw"] for t in now]),
                          s=np.concatenate([t["s"] for t in now]),
                          z=np.concatenate([t["z"] for t in now]))
            b = built[0] = (now, st)        # one assignment: a thread sees an old or a new pair
        if b[1] is None:                    # no longer one layout: one call each
            return np.concatenate([apply(t, x2) for t in b[0]], axis=1)
        return apply(b[1], x2)
    return fused


def int16_activations(xs, cpu, nu, hb, g, G):
    """Quantize x per activation block to int16 with one float scale per block.

    xs (T, n) f32 in stored column order -> xq (T, cpu, nu) int16 planes (as xp),
    sx (T, nblocks) f32, xtsum (T, G) f32. Block b spans the hb*cpu stored columns
    from b*hb*cpu (zero past n):
        sx_b = max_{c in b} |x_c| / 32767,  xq_c = round(x_c / sx_b) in [-32767, 32767],
    and x̃_c = sx_b xq_c is the activation the integer kernel multiplies by; xtsum
    holds X̃_g = Σ_{c in g} x̃_c so that the zero point sees the same x̃ as the codes.
    |x_c - x̃_c| <= sx_b / 2 (plus float32 rounding of the scale).
    """
    T, n = xs.shape
    A = hb * cpu
    nblk = -(-nu // hb)
    xb = np.zeros((T, nblk * A), np.float32)
    xb[:, :n] = xs
    xb = xb.reshape(T, nblk, A)                                     # (T, nblocks, A)
    sx = (np.abs(xb).max(axis=2) / np.float32(32767)).astype(np.float32)
    safe = np.where(sx > 0, sx, np.float32(1))
    xq = np.clip(np.rint(xb / safe[:, :, None]), -32767, 32767).astype(np.int16)
    xt = (xq.astype(np.float64) * sx[:, :, None]).reshape(T, nblk * A)[:, :n]   # x̃ (T, n)
    pad = G * g - n
    if pad > 0:
        xt = np.concatenate([xt, np.zeros((T, pad))], axis=1)
    xtsum = xt[:, :G * g].reshape(T, G, g).sum(axis=2).astype(np.float32)
    xq = np.ascontiguousarray(xq.reshape(T, nblk * A)[:, :nu * cpu].reshape(T, nu, cpu).transpose(0, 2, 1))
    return xq, sx, xtsum


@register("cpu-int", "uniform", "uniform_sparse", "spqr")
def uniform_int_cpu(q, x2):
    """The integer-activation variant of uniform_cpu (kernel "cpu-int").

    x is quantized per block of <= INT_BLOCK stored columns (never across a weight
    group) to int16 with one scale per block (int16_activations); each block's dot
    product with the codes is exact in int32, float work happens once per block and
    once per group. The result is the exact product with x̃ instead of x:
        y_int[t, r] = Σ_c W_hat[r, c] x̃[t, c]      (up to float32 rounding), so
        |y_int[t, r] - (x Ŵᵀ)[t, r]| <= ½ Σ_c |W_hat[r, c]| sx_{b(c)}
                                         + (B + G + 4) u Σ_c s_{g(c)} (q_c + |z_g|) |x̃_c|
    with B activation blocks per row, G groups and u = 2^-24 (the first term is the
    activation rounding, |x - x̃| <= sx/2; the second the float32 sums over blocks
    and groups, and the int32 -> float32 conversions). Outliers in x widen their own
    block's sx only. Non-finite x, and layouts without units ("bits" mode), go to
    the exact kernel.
    """
    return uniform_int_apply(_uniform_state(q), x2)


def uniform_int_apply(st, x2):
    """uniform_int_cpu with the kernel state st (one weight, or stacked: uniform_fuse)."""
    if st["mode"] != "units":
        return uniform_apply(st, x2)
    out, n = st["shape"]
    T = x2.shape[0]
    xs = x2 if st["perm"] is None else np.ascontiguousarray(x2[:, st["perm"]])
    if not np.isfinite(xs).all():
        return uniform_apply(st, x2)
    kern = _uniform_units(st["bits"], st["h"])
    G = st["s"].shape[1]
    xq, sx, xtsum = int16_activations(xs, st["cpu"], st["nu"], kern.block_units, st["g"], G)
    y = np.empty((T, out), np.float32)
    _run(kern.int16, T * out * n, st["qw"], st["s"], st["z"], xq, sx, xtsum, y)
    return add_outliers(y, x2, st["csr"])


uniform_int_cpu.blas_min_batch = uniform_cpu.blas_min_batch


@register("dequant_rows", "uniform", "uniform_sparse", "spqr")
def uniform_rows(q, r0, r1):
    st = _uniform_state(q)
    if st["mode"] == "units":
        n, nu, cpu = q.shape[1], st["nu"], st["cpu"]
        Ws = np.empty((r1 - r0, nu * cpu), np.float32)         # stored order (+ padding)
        _uniform_units(st["bits"], st["h"]).rows(st["qw"], st["s"], st["z"], r0, r1, Ws)
        if st["perm"] is None:
            W = Ws[:, :n] if nu * cpu == n else np.ascontiguousarray(Ws[:, :n])
        else:               # W[:, perm] = Ws, as a gather (np.take: 3-6x faster than the scatter)
            W = np.take(Ws, st["iperm"], axis=1)
    else:
        W = np.empty((r1 - r0, q.shape[1]), np.float32)
        perm = st["perm"] if st["perm"] is not None else np.zeros(0, np.int64)
        _uniform_rows(st["qw"], st["s"], st["z"], perm, r0, r1, st["bits"], st["g"], W)
    if st["csr"] is not None:
        _csr_add_rows(W, r0, *st["csr"])
    return W


# =========================================================================== codebook (CLAQ)
_LUT_KERNELS = {}        # bits -> compiled kernel


def _codebook_lut(bits):
    """kernel(qw, lut, y): y (T, out) += Σ_k lut[t, k, code[r, k]] for one width, one
    lookup per code.

    qw (out, nbb) uint8 codes of the n_b columns of this width; lut (T, n_b, 2^b)
    f32 = x[t, cols[k]] * C[k, v]. Widths 1/2/4/8 walk the bytes (cpb codes per
    byte); others extract each code from the bitstream.
    """
    if bits in _LUT_KERNELS:
        return _LUT_KERNELS[bits]
    K = 1 << bits
    cpb = 8 // bits if 8 % bits == 0 else 0
    mask = K - 1

    @njit(parallel=True, fastmath=_FM)
    def kernel(qw, lut, y):
        out, nbb = qw.shape
        T, nc = lut.shape[0], lut.shape[1]
        M = np.int32(mask)
        for r in prange(out):
            row = qw[r]
            for t in range(T):
                L = lut[t]
                a = np.float32(0.0)
                if cpb > 0:
                    nfull = nc // cpb
                    for i in range(nfull):
                        c = np.int32(row[i])
                        for p in range(cpb):
                            a += L[i * cpb + p, (c >> np.int32(bits * p)) & M]
                    for k in range(nfull * cpb, nc):
                        a += L[k, (np.int32(row[nfull]) >> np.int32(bits * (k - nfull * cpb))) & M]
                else:
                    for k in range(nc):
                        a += L[k, _code_at(row, k, bits, M, nbb)]
                y[t, r] += a

    _LUT_KERNELS[bits] = kernel
    return kernel


_BYTE_TABLES = {}        # bits -> compiled table builder


def _byte_tables(bits):
    """tables(lut, bt): bt[t, i, v] = Σ_p lut[t, i*cpb + p, (v >> bits*p) & mask] for every
    byte value v in 0..255: what byte i of a row adds to y when it holds v (cpb = 8 / bits
    codes per byte, least significant first; positions past the last column add 0).

    Built digit by digit: with the first p codes' table o[0 : K^p] done, the entries whose
    digit p is c are o[c K^p + v] = o[v] + lut[., i*cpb + p, c] (c descending, so o[v] is
    read before it is overwritten): ~1.3 adds per entry instead of cpb. The sum order is
    p = 0, 1, ... for every entry.
    """
    if bits in _BYTE_TABLES:
        return _BYTE_TABLES[bits]
    cpb = 8 // bits
    K = 1 << bits

    @njit(fastmath=_FM)
    def tables(lut, bt):
        T, nc = lut.shape[0], lut.shape[1]
        nbb = bt.shape[1]
        zero = np.float32(0.0)
        for t in range(T):
            for i in range(nbb):
                o = bt[t, i]
                k = i * cpb
                for v in range(K):
                    o[v] = lut[t, k, v] if k < nc else zero
                n = K
                for p in range(1, cpb):
                    k = i * cpb + p
                    for c in range(K - 1, -1, -1):
                        lc = lut[t, k, c] if k < nc else zero
                        for v in range(n):
                            o[c * n + v] = o[v] + lc
                    n *= K

    _BYTE_TABLES[bits] = tables
    return tables


@njit(parallel=True, fastmath=_FM)
def _codebook_bytes(qw, bt, y):
    """y (T, out) += Σ_i bt[t, i, qw[r, i]]: one table lookup per BYTE of codes (4 codes
    at 2 bits, 2 at 4 bits) for the byte-aligned widths 1, 2, 4 and 8."""
    out, nbb = qw.shape
    T = bt.shape[0]
    for r in prange(out):
        row = qw[r]
        for t in range(T):
            L = bt[t]
            a = np.float32(0.0)
            for i in range(nbb):
                a += L[i, row[i]]
            y[t, r] += a


def _codebook_state(q):
    def build():
        q._validate()
        widths = []
        for b in sorted(q.qweights):
            widths.append((b, np.ascontiguousarray(q.qweights[b]), q.columns(b),
                           np.ascontiguousarray(q.codebooks[b], dtype=np.float32)))
        return {"widths": widths, "csr": csr_state(q.outliers)}
    key = (q.column_bits, q.outliers) + tuple(q.qweights[b] for b in sorted(q.qweights)) \
        + tuple(q.codebooks[b] for b in sorted(q.codebooks))
    return _cached(q, key, build)


# The byte tables pay off at 1 and 2 bits on every shape measured; at 4 bits a table
# of in/2 x 256 entries (288 KiB for 576 inputs) is slower to look up than the per-code
# LUT (36 KiB) on SmolLM2's layers (out 576 and 1536: 0.7-0.85x), and faster on
# 4096x4096 (1.3-1.6x); at 8 bits the two are the same table.
BYTE_TABLE_MIN_OUT = {4: 2048, 8: 0}


@register("cpu", "codebook")
def codebook_cpu(q, x2):
    st = _codebook_state(q)
    T = x2.shape[0]
    y = np.zeros((T, q.shape[0]), np.float32)
    for b, qw, cols, C in st["widths"]:
        lut = np.ascontiguousarray(x2[:, cols][:, :, None] * C[None])     # (T, n_b, 2^b)
        work = T * qw.shape[0] * cols.size
        if 8 % b == 0 and (b <= 2 or qw.shape[0] >= BYTE_TABLE_MIN_OUT[b]):
            bt = np.empty((T, qw.shape[1], 256), np.float32)
            _byte_tables(b)(lut, bt)
            _run(_codebook_bytes, work, qw, bt, y)
        else:
            _run(_codebook_lut(b), work, qw, lut, y)
    return add_outliers(y, x2, st["csr"])


@njit(cache=True, parallel=True)
def _codebook_rows(qw, C, cols, bits, r0, r1, W):
    """W[i, cols[k]] = C[k, code[r0 + i, k]] for the columns of one width (any 1..8)."""
    nb = qw.shape[1]
    M = np.int32((1 << bits) - 1)
    for i in prange(r1 - r0):
        row = qw[r0 + i]
        for k in range(cols.shape[0]):
            W[i, cols[k]] = C[k, _code_at(row, k, bits, M, nb)]


@register("dequant_rows", "codebook")
def codebook_rows(q, r0, r1):
    """W_hat[r0:r1] (the large-batch BLAS path): each width's codes through its
    codebooks, then the CSR outliers. Columns of width 0 (none stored) stay 0."""
    st = _codebook_state(q)
    W = np.zeros((r1 - r0, q.shape[1]), np.float32)
    for b, qw, cols, C in st["widths"]:
        _codebook_rows(qw, C, cols, b, r0, r1, W)
    if st["csr"] is not None:
        _csr_add_rows(W, r0, *st["csr"])
    return W


# =========================================================================== additive (AQLM)
ADDITIVE_MIN_ROWS = 256  # rows per prange item of the LUT kernel: at least this many
_ADDITIVE_KERNELS = {}  # M -> compiled kernel


def _additive_lut(M):
    """kernel(codes_gm, lut, s, y, rows): y[t, r] = s[r] Σ_k Σ_m lut[t, k, m, codes[r, k, m]].

    lut (T, Kg, M, 2^B). codes_gm is the codes in group-major order (Kg, out, M),
    made once per weight: for one group k the M tables lut[t, k] (M KiB at
    B = 8) stay in L1 while a block of rows looks them up with codes that are
    contiguous in memory. (Row-major codes would sweep the whole Kg x M x 2^B
    table, 1 MiB at 4096 inputs, once per row.) M is a compile-time constant
    (one kernel per M: the m loop unrolls, measured 2-3x faster than a runtime
    M). Each row's sum runs over k, then m, in order, by the one thread owning
    its block of `rows` rows; so the result does not depend on `rows`, and the
    caller gives each thread one block (out / threads rows): the fewer the
    blocks, the fewer passes over the table (one block of 4096 rows measured
    1.27x faster than four of 1024, bit-identical).
    """
    if M in _ADDITIVE_KERNELS:
        return _ADDITIVE_KERNELS[M]

    @njit(parallel=True, fastmath=_FM)
    def kernel(codes_gm, lut, s, y, rows):
        Kg, out, _ = codes_gm.shape
        T = lut.shape[0]
        nblk = (out + rows - 1) // rows
        for blk in prange(nblk):
            r0 = blk * rows
            r1 = min(out, r0 + rows)
            acc = np.empty(r1 - r0, np.float32)
            for t in range(T):
                acc[:] = 0.0
                for k in range(Kg):
                    ck = codes_gm[k]
                    L = lut[t, k]
                    for r in range(r0, r1):
                        a = acc[r - r0]
                        for m in range(M):
                            a += L[m, ck[r, m]]
                        acc[r - r0] = a
                for r in range(r0, r1):
                    y[t, r] = s[r] * acc[r - r0]

    _ADDITIVE_KERNELS[M] = kernel
    return kernel


@njit(cache=True, parallel=True, fastmath=_FM)
def _additive_direct(codes, C, s, x, y):
    """Codebooks too large for a LUT (B > 8): y[t, r] = s[r] Σ_k (Σ_m C_m[code]) · x_k."""
    out, Kg, M = codes.shape
    g = C.shape[2]
    T = x.shape[0]
    for r in prange(out):
        for t in range(T):
            a = np.float32(0.0)
            for k in range(Kg):
                for j in range(g):
                    w = np.float32(0.0)
                    for m in range(M):
                        w += C[m, codes[r, k, m], j]
                    a += w * x[t, k * g + j]
            y[t, r] = s[r] * a


def _additive_state(q):
    def build():
        q._validate()
        M, K, g = q.codebooks.shape
        use_lut = (q.shape[1] // g) * M * K <= ADDITIVE_LUT_MAX
        # the LUT kernel reads a group-major copy of the codes (same bytes, (Kg, out, M))
        codes = np.transpose(q.codes, (1, 0, 2)) if use_lut else q.codes
        return {"lut": use_lut, "codes": np.ascontiguousarray(codes),
                "C": np.ascontiguousarray(q.codebooks, dtype=np.float32),     # (M, 2^B, g)
                "s": np.ascontiguousarray(q.scales, dtype=np.float32)}
    return _cached(q, (q.codes, q.codebooks, q.scales), build)


def additive_table(x2, C):
    """LUT[t, k, m, j] = x[t, k-th group] · C_m[j]: one small GEMM per call.
    x2 (T, in) f32, C (M, 2^B, g) f32 -> (T, in/g, M, 2^B) f32, contiguous."""
    T = x2.shape[0]
    M, K, g = C.shape
    Kg = x2.shape[1] // g
    lut = (x2.reshape(T * Kg, g) @ C.reshape(M * K, g).T).reshape(T, Kg, M, K)
    return np.ascontiguousarray(lut, dtype=np.float32)


# LUT entries per token above which the direct kernel is used instead
ADDITIVE_LUT_MAX = 1 << 22


@register("cpu", "additive")
def additive_cpu(q, x2):
    st = _additive_state(q)
    out, n = q.shape
    T = x2.shape[0]
    C = st["C"]
    M = C.shape[0]
    y = np.empty((T, out), np.float32)
    if st["lut"]:
        lut = additive_table(x2, C)
        work = T * out * n
        # one block of rows per thread (a serial product: one block); any split gives the same y
        rows = out if work < PAR_MIN_WORK else max(ADDITIVE_MIN_ROWS, -(-out // numba.get_num_threads()))
        _run(_additive_lut(M), work, st["codes"], lut, st["s"], y, rows)
    else:
        _run(_additive_direct, T * out * n, st["codes"], C, st["s"], x2, y)
    return y


# =========================================================================== row_lut (SqueezeLLM)
@njit(cache=True, parallel=True, fastmath=_FM)
def _row_lut(qw, lut, x, y, bits):
    """y[t, r] = Σ_v lut[r, v] · (Σ_{c: code[r, c] = v} x[t, c]): bucket sums of x per code,
    then one short dot with the row's table (SqueezeLLM's per-row LUT)."""
    out, nb = qw.shape
    T, n = x.shape
    K = 1 << bits
    M = np.int32(K - 1)
    for r in prange(out):
        row = qw[r]
        acc = np.zeros(K, np.float32)
        for t in range(T):
            acc[:] = 0
            for c in range(n):
                acc[_code_at(row, c, bits, M, nb)] += x[t, c]
            a = np.float32(0.0)
            for v in range(K):
                a += lut[r, v] * acc[v]
            y[t, r] = a


def _row_lut_state(q):
    def build():
        return {"qw": np.ascontiguousarray(q.qweight),
                "lut": np.ascontiguousarray(q.lut, dtype=np.float32),
                "csr": csr_state(q.outliers)}
    st = _cached(q, (q.qweight, q.lut, q.outliers), build)
    if st["qw"].dtype != np.uint8 or st["lut"].shape != (q.shape[0], 1 << q.bits):
        raise RefqError(f"row_lut weight: packed tensors do not match shape {q.shape}")
    return st


@njit(cache=True, parallel=True)
def _row_lut_rows(qw, lut, bits, r0, r1, W):
    """W[i, c] = lut[r0 + i, code[r0 + i, c]]."""
    nb = qw.shape[1]
    M = np.int32((1 << bits) - 1)
    for i in prange(r1 - r0):
        row = qw[r0 + i]
        for c in range(W.shape[1]):
            W[i, c] = lut[r0 + i, _code_at(row, c, bits, M, nb)]


@register("dequant_rows", "row_lut")
def row_lut_rows(q, r0, r1):
    """W_hat[r0:r1] for the large-batch BLAS path: each row's table, then the CSR outliers."""
    st = _row_lut_state(q)
    W = np.empty((r1 - r0, q.shape[1]), np.float32)
    _row_lut_rows(st["qw"], st["lut"], q.bits, r0, r1, W)
    if st["csr"] is not None:
        _csr_add_rows(W, r0, *st["csr"])
    return W


@register("cpu", "row_lut")
def row_lut_cpu(q, x2):
    st = _row_lut_state(q)
    y = np.empty((x2.shape[0], q.shape[0]), np.float32)
    _run(_row_lut, x2.shape[0] * q.shape[0] * q.shape[1], st["qw"], st["lut"], x2, y, q.bits)
    return add_outliers(y, x2, st["csr"])
