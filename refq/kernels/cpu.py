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
             x @ dequantize().T (the default); a float multiply-add per code;
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
    with X[t, g] = Σ_{c in g} x[t, c] computed once per token. Small batches
    vectorise ACROSS ROWS: a vector lane holds one output row, so no dot
    product ends in a horizontal reduction. The codes are repacked once per
    weight (lane_layout; kept in the kernel state: about the packed size
    again, 4/3 of it at 3 bits) into blocks of LANES = 64 rows, word w of
    row l holding cpw codes (8, or 4 at 5-8 bits) in slots of 1, 2, 4 or 8
    bits (a 3-bit code in 4), and for each word the loop over the 64 lanes is
        a[l] += Σ_p float(word[l] >> (slot*p) & mask) * x[t, w*cpw + p]
    with x[t, w*cpw + p] one number broadcast to every lane; once per group,
    in vectors, y[l] += s[g, l] (a[l] - z[g, l] X[g]). Any group size works
    (cpw halves until it divides it). With act-order `perm`, x is gathered
    into stored order (x[:, perm]) in the same call (stored_x). Batches from
    6 (<= 2 bits) or 12 tokens (refq.kernels.BLAS_MIN_BATCH): dequantize
    tiles of rows with `uniform_rows` (read in UNITS, the fewest whole bytes
    holding whole codes, unit_geometry; bit extraction for group sizes that
    split a unit) and multiply by BLAS. `uniform_sparse` adds the CSR
    outliers (below).

codebook (CLAQ: one codebook per column, mixed widths)
    LUT[t, c, k] = x[t, c] · C_c[k]; y[t, r] = Σ_b Σ_{c of width b} LUT[t, c, code[r, c]]
    (widths ascending, columns ascending), then + CSR outliers. Each width's codes are
    read as DIGIT BYTES of cpb = 8 // b codes (digit_codes: the packed bytes at 1, 2, 4, 8
    bits; 2 codes per byte at 3 bits, 1 at 5-7, a copy made once per weight), and the
    LUT is folded once per call into a table per digit byte,
        BT[t, i, v] = Σ_p LUT[t, i*cpb + p, digit p of v]    (2^(cpb*b) entries),
    so a row costs one lookup per byte (4 codes at 2 bits), in the TILED LUT kernel
    (_tiled_lut, shared with AQLM):
        y[t, r] += Σ_i BT[t, i, byte i of row r]
    with the byte positions in tiles of 64 (tiles outer, rows inner: a tile's tables are
    read by a whole block of rows while their codes stream through).
    Large batches: `codebook_rows` decodes tiles of rows for BLAS.

additive (AQLM)
    LUT[t, k*M + m, j] = x[t, k-th group] · C_m[j]  (a small GEMM per token);
    y[t, r] = s[r] Σ_k Σ_m LUT[t, k*M + m, code[r, k, m]]: the same tiled LUT kernel,
    one table per (group, codebook) position; codebooks too large for a table
    (1x16) use the direct kernel (Σ_m C_m[code]) · x_k.

spqr: the uniform kernels, with the bilevel scales/zeros decoded once to float32.

row_lut (SqueezeLLM: one table per output row)
    y[t, r] = Σ_c lut[r, code[r, c]] x[t, c]: the row read in units as the uniform
    kernel does, each code looked up in the row's 2^b-entry table (vector gathers
    from L1) and multiplied by its plane of x, in chunks of constant length.

CSR outliers (refq.formats.outliers): y[t, r] += Σ_e S_val[e] x[t, S_col[e]]
    over row r's entries, ascending, after the dense part.
"""
import numba
import numpy as np
from numba import njit, prange

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from refq.errors import RefqError
from refq.formats.packing import packed_nbytes, unpack
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


_UNIT_READERS = {}      # ub -> (word, its integer type)


def _unit_reader(ub):
    """(word, WT): word(row, u) reads unit u of a packed row (ub bytes, see unit_geometry)
    as one little-endian integer of type WT (int32 for units of <= 3 bytes, <= 24 bits;
    int64 for 5 and 7 bytes). Shared by the uniform row tiles and the row_lut kernel."""
    if ub not in _UNIT_READERS:
        WT = np.int32 if ub <= 3 else np.int64

        @njit(inline="always")
        def word(row, u):
            i = u * ub
            v = WT(row[i])
            for j in range(1, ub):
                v |= WT(row[i + j]) << WT(8 * j)
            return v
        _UNIT_READERS[ub] = (word, WT)
    return _UNIT_READERS[ub]


def _unit_rows(bits, h):
    """Row-tile decoder for groups of h whole units (see unit_geometry), compiled once
    per (bits, h): rows(qw, s, z, r0, r1, W) writes W (r1-r0, nu*cpu) = W_hat[r0:r1]
    in STORED column order (padding columns too), for the BLAS path of larger batches
    (uniform_rows). bits and h are closure constants, so the unit loops have
    compile-time trip counts. qw (out, >= nu*ub) uint8; s, z (out, G) f32.
    """
    key = (bits, h)
    if key in _UNIT_KERNELS:
        return _UNIT_KERNELS[key]
    ub, cpu = unit_geometry(bits)
    mask = (1 << bits) - 1
    word, WT = _unit_reader(ub)

    @njit(parallel=True)
    def rows(qw, s, z, r0, r1, W):
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

    _UNIT_KERNELS[key] = rows
    return rows


@njit(inline="always")
def _code_at(row, k, bits, M, nb):
    """Code k of a packed row (any width 1..8; may straddle two bytes)."""
    bit = k * bits
    i = bit >> 3
    v = np.int32(row[i])
    if i + 1 < nb:
        v |= np.int32(row[i + 1]) << np.int32(8)
    return (v >> np.int32(bit & 7)) & M


# --------------------------------------------------------------------------- batch-1 kernels
# The small-batch kernels vectorise ACROSS ROWS: a vector lane holds one output row,
# never a column, so no dot product ends in a horizontal reduction (the old row-wise
# loop reduced a vector to a scalar for every group of every row, and groups of 32
# ran at 0.2-0.5x the fp32 GEMV). For that the codes are repacked once per weight
# (lane_layout, cached in the kernel state) into blocks of LANES rows:
#     wl[b, w, l] = word w of row b*LANES + l: codes w*cpw .. w*cpw+cpw-1 of that row,
#                   code p in bits [slot*p, slot*(p+1)) of an unsigned int (lane_geometry),
# slot = bits rounded up to 1, 2, 4 or 8 (a 3-bit code sits in 4 bits, 8 to a uint32:
# as many bytes as 3-byte units padded to 4, and the 3-bit kernel is the 4-bit one),
# so the LANES rows' words for one w are contiguous and one vector load reads a word
# of every row. For one token and one block the loop is
#     a[l] += Σ_p float(wl[b, w, l] >> (slot*p) & mask) * x[w*cpw + p]   (every lane l)
# with each x[w*cpw + p] one number broadcast to all lanes, and once per group, in
# vectors,
#     y[l] += s[g, l] (a[l] - z[g, l] X[g]).
LANES = 64              # rows per block: 8 AVX2/AVX-512 vectors of float32 (32 ran 5x slower)
INT_BLOCK = 128         # most columns per int16 activation block (int32 cannot overflow)
_LANE_KERNELS = {}      # (slot, cpw) -> compiled kernels


# Software prefetch: the kernels ask for the codes PREFETCH_WORDS words ahead (2-4 KiB of
# a row block) while they decode the current word. Without it, a layer whose codes are not
# in cache (every layer of a model larger than the cache, in turn) ran 1.5-2.4x slower:
# the hardware prefetcher did not keep up, and reading and decoding did not overlap
# (4096x4096 g128 after a 64 MiB copy, 1 thread: cpu 2.4 / 1.5-1.8 / 1.5-2.0 ms without,
# 1.0 / 1.2 / 1.2 ms with, at 2 / 3 / 4 bits; BENCHMARKS.md).
PREFETCH_WORDS = 16


@intrinsic
def prefetch(typingctx, arr, i):
    """A hint that element i of arr's buffer (counted from its first element, may lie
    past its end) will be read soon: LLVM's llvm.prefetch (x86 prefetcht0), which
    never faults and changes no result."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), "llvm.prefetch.p0i8")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])     # read, keep in all cache levels, data
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


# Vector width of the float lane loop. numba compiles for the CPU name LLVM guesses for
# the host, and LLVM's tuning for some of its names prefers 256-bit vectors even when the
# CPU has AVX-512: with llvmlite 0.50, "rocketlake", the name it gives the Sapphire Rapids
# virtual machines refq was measured on (skylake-avx512, icelake, tigerlake,
# sapphirerapids and znver4 already got 512-bit vectors). On ymm registers the lane loop
# takes twice the instructions of zmm for the same 64 lanes, and it is bound by those
# instructions (per code and vector: a shift, an and, an int -> float conversion, an FMA),
# not by memory: with 512-bit vectors the float kernel ran 1.3-1.4x faster (4096x4096
# w2-w4, 1 thread; BENCHMARKS.md "Vector width of the float lane kernel"). So block_dot
# asks for 512-bit vectors for itself only; users' numba settings (NUMBA_CPU_NAME /
# FEATURES) and every other function keep LLVM's choice. Without AVX-512 the hint changes
# nothing (AVX2 code identical). The int16 kernel keeps LLVM's choice: zmm was not faster
# there (0.85-1.0 vs 0.83-1.0 ms).
PREFER_VECTOR_BITS = 512


@intrinsic
def prefer_vector_width(typingctx):
    """Sets LLVM's function attribute "prefer-vector-width" to PREFER_VECTOR_BITS on
    the function that calls it (a code generation hint: the result of every lane is
    computed by the same operations in the same order, only more lanes per
    instruction). llvmlite accepts only a fixed list of attribute names, so the
    attribute is added to its set directly; if that ever fails the hint is skipped."""
    def codegen(context, builder, signature, args):
        attrs = builder.function.attributes
        if isinstance(attrs, set):
            set.add(attrs, f'"prefer-vector-width"="{PREFER_VECTOR_BITS}"')
        return context.get_dummy_value()
    return types.void(), codegen


def lane_geometry(bits, g, G):
    """(slot, cpw, dtype) of a word of lane_layout: cpw codes, each in `slot` bits
    (bits rounded up to 1, 2, 4 or 8), cpw = 8 (slots of 1 to 4 bits) or 4 (8 bits)
    halved until it divides the group size so that every group starts on a word
    (G == 1: any); dtype the smallest unsigned integer that holds cpw slots (uint8
    at 1 bit, uint16 at 2, uint32 above). At most 8 codes a word: the kernels' plane
    loop `for p in range(cpw)` is then unrolled with constant shifts (with 16 codes
    it was not, and ran 2x slower on 64-bit shifts); power-of-two slots: LLVM then
    fuses the int16 multiply-adds into VNNI vpdpwssd (at 3, 5, 6, 7-bit spacing it
    did not)."""
    slot = 1 << int(np.ceil(np.log2(bits)))
    cpw = 8 if slot <= 4 else 4
    while G > 1 and g % cpw:
        cpw //= 2
    nbits = cpw * slot
    return slot, cpw, np.uint8 if nbits <= 8 else np.uint16 if nbits <= 16 else np.uint32


def lane_layout(codes, bits, g, G):
    """The repacked copy of a weight's codes for the lane kernels (see above).

    codes (out, n) uint8 in stored column order. Returns wl (nblocks, nw, LANES)
    of lane_geometry's dtype, slot and cpw. Columns are padded with code 0 to G*g
    (or to whole words when G == 1), rows with code 0 to whole blocks; x is padded
    with zeros to match, so padding adds nothing. Memory (groups of a multiple of 8):
    the packed size at 1, 2, 4, 8 bits, 4/3 of it at 3 and 6 bits, 8/5 at 5, 8/7 at 7
    (plus padding).
    """
    out, n = codes.shape
    slot, cpw, dtype = lane_geometry(bits, g, G)
    ncol = G * g if G > 1 else -(-n // cpw) * cpw
    nblk = -(-out // LANES)
    c = np.zeros((nblk * LANES, ncol), np.uint32)
    c[:out, :n] = codes
    c = c.reshape(nblk * LANES, ncol // cpw, cpw)
    w = np.zeros(c.shape[:2], np.uint32)
    for p in range(cpw):
        w |= c[:, :, p] << np.uint32(slot * p)
    return np.ascontiguousarray(w.reshape(nblk, LANES, -1).transpose(0, 2, 1).astype(dtype)), slot, cpw


def lane_params(v, out):
    """(out, G) per-row scales or zeros -> (nblocks, G, LANES) float32, padded with 0."""
    nblk = -(-out // LANES)
    p = np.zeros((nblk * LANES, v.shape[1]), np.float32)
    p[:out] = v
    return np.ascontiguousarray(p.reshape(nblk, LANES, -1).transpose(0, 2, 1))


@njit(cache=True)
def stored_x(x2, perm, ncol, G):
    """One call that prepares x for the lane kernels (per call, few numpy operations:
    on a small layer each costs more than the product once the caches are cold).

    Returns xs (T, ncol) f32, x in stored column order (x2[:, perm] with act-order;
    perm empty = none), zero from column n on, and xsum (T, G) f32, the sums
    X[t, g] = Σ_{c in g} xs[t, c] over groups of ncol // G columns (in float64,
    rounded once)."""
    T, n = x2.shape
    xs = np.zeros((T, ncol), np.float32)
    for t in range(T):
        for c in range(n):
            xs[t, c] = x2[t, perm[c]] if perm.shape[0] > 0 else x2[t, c]
    gs = ncol // G
    xsum = np.empty((T, G), np.float32)
    for t in range(T):
        for gi in range(G):
            acc = 0.0
            for c in range(gi * gs, gi * gs + gs):
                acc += xs[t, c]
            xsum[t, gi] = acc
    return xs, xsum


@njit(cache=True)
def int16_activations(xs, G, hw, hb, cpw):
    """Quantize x per activation block to int16 with one float scale per block.

    xs (T, G*hw*cpw) f32 in stored column order, zero-padded (stored_x). Group g's
    columns are cut into blocks of hb*cpw columns from the group's start (the last
    one of a group shorter), so no block straddles a group; over block j:
        sx_j = max_{c in j} |x_c| / 32767,  xq_c = round(x_c / sx_j) in [-32767, 32767],
    and x̃_c = sx_j xq_c is the activation the integer kernel multiplies by. Returns
    xq (T, ncol) int16, sx (T, G * blocks per group) f32 and xtsum (T, G) f32,
    X̃_g = Σ_{c in g} x̃_c (in float64, rounded once), so that the zero point sees the
    same x̃ as the codes. |x_c - x̃_c| <= sx_j / 2 (plus float32 rounding of the scale).
    """
    T, ncol = xs.shape
    nbg = (hw + hb - 1) // hb                          # blocks per group
    xq = np.zeros((T, ncol), np.int16)
    sx = np.empty((T, G * nbg), np.float32)
    xtsum = np.empty((T, G), np.float32)
    for t in range(T):
        for gi in range(G):
            tot = 0.0
            for j in range(nbg):
                c0 = (gi * hw + j * hb) * cpw
                c1 = min(c0 + hb * cpw, (gi * hw + hw) * cpw)
                m = np.float32(0.0)
                for c in range(c0, c1):
                    m = max(m, abs(xs[t, c]))
                sc = np.float32(m / np.float32(32767))
                sx[t, gi * nbg + j] = sc
                safe = sc if sc > 0 else np.float32(1.0)
                for c in range(c0, c1):
                    v = min(max(np.rint(xs[t, c] / safe), np.float32(-32767)), np.float32(32767))
                    xq[t, c] = np.int16(v)
                    tot += np.float64(v) * np.float64(sc)
            xtsum[t, gi] = tot
    return xq, sx, xtsum


def _uniform_lanes(slot, cpw):
    """The small-batch kernels for codes in `slot` bits, cpw to a word (lane_geometry):
    "cpu" (float activations) and "cpu-int" (int16 activations), compiled once per
    (slot, cpw).

    slot and cpw are closure constants, so the plane loop `for p in range(cpw)` is
    unrolled with constant shifts and the lane loops have a constant trip count
    (LANES) that LLVM turns into whole vectors. Numba cannot cache closures on disk:
    the first product of a new width compiles for a few seconds.

    kernel(wl, s, z, x2, perm, hw, y): wl (nblocks, nw, LANES) words (lane_layout);
    s, z (nblocks, G, LANES) f32 (lane_params); x2 (T, in) f32; perm (in,) int64 or
    empty; hw words per group (nw when G == 1); y (T, out) f32 (written). x is
    prepared (stored_x, int16_activations) inside the same call: on small layers
    every extra call from Python costs more than the product once caches are cold.
    kernel.int16(wl, s, z, x2, perm, hw, hb, y) -> False (y untouched) if x has a
    non-finite value; hb words per activation block.
    """
    key = (slot, cpw)
    if key in _LANE_KERNELS:
        return _LANE_KERNELS[key]
    M = np.uint32((1 << slot) - 1)
    LINE = 64 * 8 // max(8, slot * cpw)             # words of one row block per 64-byte cache line

    @njit(fastmath=_FM)
    def block_dot(wb, s, z, x, xsum, t, hw, a, yb):
        """yb[l] = y[t, row l of the block] = Σ_g s_g (Σ_{c in g} q_c x_c - z_g X_g)."""
        prefer_vector_width()                                  # zmm on AVX-512 (see above)
        G = s.shape[0]
        for l in range(LANES):
            yb[l] = 0.0
        for gi in range(G):
            for l in range(LANES):
                a[l] = 0.0
            for w in range(gi * hw, gi * hw + hw):
                for k in range(0, LANES, LINE):                # the word PREFETCH_WORDS ahead
                    prefetch(wb, (w + PREFETCH_WORDS) * LANES + k)
                for l in range(LANES):
                    v = np.uint32(wb[w, l])                    # cpw codes of row l
                    d = a[l]
                    for p in range(cpw):                       # x[t, w*cpw + p]: one column, all lanes
                        d += np.float32(np.int32(v & M)) * x[t, w * cpw + p]
                        v = np.uint32(v >> np.uint32(slot))    # the next code to the bottom
                    a[l] = d
            Xg = xsum[t, gi]
            for l in range(LANES):
                yb[l] += s[gi, l] * (a[l] - z[gi, l] * Xg)

    @njit(parallel=True, fastmath=_FM)
    def kernel(wl, s, z, x2, perm, hw, y):
        T, out = y.shape
        x, xsum = stored_x(x2, perm, wl.shape[1] * cpw, s.shape[1])
        for b in prange(wl.shape[0]):
            a = np.empty(LANES, np.float32)
            yb = np.empty(LANES, np.float32)
            for t in range(T):
                block_dot(wl[b], s[b], z[b], x, xsum, t, hw, a, yb)
                for l in range(min(LANES, out - b * LANES)):
                    y[t, b * LANES + l] = yb[l]

    @njit
    def block_int(wb, s, z, xq, sx, xtsum, t, hw, hb, a, acc, yb):
        """yb[l] with int16 activations: per activation block j of group g (hb words,
        the last one of a group shorter) an exact int32 sum Σ_{c in j} q_c xq_c,
        scaled once by the block's sx; per group y += s_g (Σ_j sx_j (Σ q xq) - z_g X̃_g).

        Every integer step is cast back to int32 (numba widens int arithmetic to
        int64, which LLVM does not vectorise as well): |Σ q xq| <= 128 * 255 * 32767
        < 2^31, so nothing overflows. The int32 multiply of a code (< 256) by an
        int16 becomes vpmaddwd (VNNI: vpdpwssd)."""
        G = s.shape[0]
        nbg = -(-hw // hb)                                  # activation blocks per group
        for l in range(LANES):
            yb[l] = 0.0
        for gi in range(G):
            for l in range(LANES):
                acc[l] = 0.0
            for j in range(nbg):
                for l in range(LANES):
                    a[l] = 0
                w0 = gi * hw + j * hb
                for w in range(w0, min(w0 + hb, gi * hw + hw)):
                    for k in range(0, LANES, LINE):
                        prefetch(wb, (w + PREFETCH_WORDS) * LANES + k)
                    for l in range(LANES):
                        v = np.uint32(wb[w, l])
                        d = np.int32(0)
                        for p in range(cpw):
                            d = np.int32(d + np.int32(v & M) * np.int32(xq[t, w * cpw + p]))
                            v = np.uint32(v >> np.uint32(slot))
                        a[l] = np.int32(a[l] + d)
                sc = sx[t, gi * nbg + j]
                for l in range(LANES):
                    acc[l] += sc * np.float32(a[l])
            Xg = xtsum[t, gi]
            for l in range(LANES):
                yb[l] += s[gi, l] * (acc[l] - z[gi, l] * Xg)

    @njit(parallel=True)
    def kernel_int(wl, s, z, x2, perm, hw, hb, y):
        T, out = y.shape
        for t in range(T):
            for c in range(x2.shape[1]):
                if not np.isfinite(x2[t, c]):
                    return False
        x = stored_x(x2, perm, wl.shape[1] * cpw, s.shape[1])[0]
        xq, sx, xtsum = int16_activations(x, s.shape[1], hw, hb, cpw)
        for b in prange(wl.shape[0]):
            a = np.empty(LANES, np.int32)
            acc = np.empty(LANES, np.float32)
            yb = np.empty(LANES, np.float32)
            for t in range(T):
                block_int(wl[b], s[b], z[b], xq, sx, xtsum, t, hw, hb, a, acc, yb)
                for l in range(min(LANES, out - b * LANES)):
                    y[t, b * LANES + l] = yb[l]
        return True

    kernel.int16 = kernel_int
    kernel.block_functions = {"float": block_dot, "int16": block_int}   # asm checks
    _LANE_KERNELS[key] = kernel
    return kernel


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
    """Kernel state. The row-tile decoder of the BLAS path (uniform_rows) reads units
    in mode "units" (groups start on a unit boundary, or one group per row): qw is
    padded with zero bytes to whole units when the row ends inside one (a copy, only
    for shapes where in * bits is not a multiple of 8 * unit bytes); otherwise mode
    "bits", bit extraction. The small-batch lane kernels' copy ("lanes") is added by
    _lane_state on the first small-batch product."""
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


def _lane_state(st, n):
    """The lane kernels' copy of a weight (lane_layout), made on its first small-batch
    product and kept in the kernel state (the BLAS path of large batches never needs it)."""
    if "lanes" not in st:
        out = st["s"].shape[0]
        G = st["s"].shape[1]
        bits, g = st["bits"], st["g"] if G > 1 else n
        codes = unpack(st["qw"][:, :packed_nbytes(n, bits)], bits, n)
        wl, slot, cpw = lane_layout(codes, bits, g, G)
        st["lanes"] = {"wl": wl, "slot": slot, "cpw": cpw, "hw": wl.shape[1] // G,
                       "s": lane_params(st["s"], out), "z": lane_params(st["z"], out),
                       "perm": np.zeros(0, np.int64) if st["perm"] is None else st["perm"]}
    return st["lanes"]


@register("cpu", "uniform", "uniform_sparse", "spqr")
def uniform_cpu(q, x2):
    return uniform_apply(_uniform_state(q), x2)


def uniform_apply(st, x2):
    """uniform_cpu with the kernel state st: of one weight, or of weights stacked
    by rows (uniform_fuse)."""
    out, n = st["shape"]
    T = x2.shape[0]
    ls = _lane_state(st, n)
    y = np.empty((T, out), np.float32)
    _run(_uniform_lanes(ls["slot"], ls["cpw"]), T * out * n, ls["wl"], ls["s"], ls["z"], x2, ls["perm"],
         ls["hw"], y)
    return add_outliers(y, x2, st["csr"])


uniform_cpu.blas_min_batch = lambda q: 6 if q.bits <= 2 else 12     # measured crossover


def _stackable(sts):
    """Kernel states that one lane-kernel call can run stacked by rows (uniform_fuse):
    the same width, groups and inputs (which fix G and the unit layout), groups on
    whole units, the same act-order permutation, and no outliers."""
    a = sts[0]
    for st in sts:
        if (st["bits"] != a["bits"] or st["g"] != a["g"] or st["shape"][1] != a["shape"][1]
                or st["mode"] != "units" or st["csr"] is not None
                or (st["perm"] is None) != (a["perm"] is None)
                or (a["perm"] is not None and not np.array_equal(st["perm"], a["perm"]))):
            return False
    return True


@register("fuse", "uniform")
def uniform_fuse(qs, kernel):
    """x2 -> x2 [Ŵ_1; Ŵ_2; ...]ᵀ in one kernel call, for uniform weights that share
    their input (refq.kernels.fuse), or None. Every output row of the lane
    kernels is summed in its own lane (the same operations, whatever rows surround
    it), so the stacked codes, scales and zeros give each weight's rows exactly as
    its own call does. Needs one layout (_stackable): the same bits, groups on whole
    units and act-order permutation (GPTQ's q/k/v and gate/up share a Hessian, hence
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
                base = {k: v for k, v in now[0].items() if k != "lanes"}   # not its lane copy
                st = dict(base, shape=(sum(t["shape"][0] for t in now), now[0]["shape"][1]),
                          qw=np.concatenate([t["qw"] for t in now]),
                          s=np.concatenate([t["s"] for t in now]),
                          z=np.concatenate([t["z"] for t in now]))
            b = built[0] = (now, st)        # one assignment: a thread sees an old or a new pair
        if b[1] is None:                    # no longer one layout: one call each
            return np.concatenate([apply(t, x2) for t in b[0]], axis=1)
        return apply(b[1], x2)
    return fused


@register("cpu-int", "uniform", "uniform_sparse", "spqr")
def uniform_int_cpu(q, x2):
    """The integer-activation variant of uniform_cpu (kernel "cpu-int").

    x is quantized per block of <= INT_BLOCK stored columns (never across a weight
    group: each group cut into blocks from its start) to int16 with one scale per
    block (int16_activations); each block's dot product with the codes is exact in
    int32, float work happens once per block and once per group. The result is the
    exact product with x̃ instead of x:
        y_int[t, r] = Σ_c W_hat[r, c] x̃[t, c]      (up to float32 rounding), so
        |y_int[t, r] - (x Ŵᵀ)[t, r]| <= ½ Σ_c |W_hat[r, c]| sx_{b(c)}
                                         + (B + G + 4) u Σ_c s_{g(c)} (q_c + |z_g|) |x̃_c|
    with B activation blocks per row, G groups and u = 2^-24 (the first term is the
    activation rounding, |x - x̃| <= sx/2; the second the float32 sums over blocks
    and groups, and the int32 -> float32 conversions). Outliers in x widen their own
    block's sx only. Non-finite x goes to the exact kernel.
    """
    return uniform_int_apply(_uniform_state(q), x2)


def uniform_int_apply(st, x2):
    """uniform_int_cpu with the kernel state st (one weight, or stacked: uniform_fuse)."""
    out, n = st["shape"]
    T = x2.shape[0]
    ls = _lane_state(st, n)
    cpw, hw = ls["cpw"], ls["hw"]
    hb = min(hw, INT_BLOCK // cpw)                   # words per activation block
    y = np.empty((T, out), np.float32)
    if not _run(_uniform_lanes(ls["slot"], cpw).int16, T * out * n, ls["wl"], ls["s"], ls["z"], x2,
                ls["perm"], hw, hb, y):
        return uniform_apply(st, x2)                 # x has NaN or Inf
    return add_outliers(y, x2, st["csr"])


uniform_int_cpu.blas_min_batch = uniform_cpu.blas_min_batch


@register("dequant_rows", "uniform", "uniform_sparse", "spqr")
def uniform_rows(q, r0, r1):
    st = _uniform_state(q)
    if st["mode"] == "units":
        n, nu, cpu = q.shape[1], st["nu"], st["cpu"]
        Ws = np.empty((r1 - r0, nu * cpu), np.float32)         # stored order (+ padding)
        _unit_rows(st["bits"], st["h"])(st["qw"], st["s"], st["z"], r0, r1, Ws)
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
_BYTE_TABLES = {}        # bits -> compiled table builder


def _byte_tables(bits):
    """tables(lut, bt): bt[t, i, v] = Σ_p lut[t, i*cpb + p, (v >> bits*p) & mask] for every
    value v < 2^(cpb*bits) of a digit byte (digit_codes): what byte i of a row adds to y
    when it holds v (cpb = 8 // bits codes per byte, least significant first: 256 entries
    at 1, 2, 4, 8 bits, 64 at 3 bits, 2^bits at 5-7; positions past the last column add 0).

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


LUT_TILE = 64            # table positions per tile of the tiled LUT kernel (a compile-time constant)
_TILED_KERNELS = {}      # K -> compiled kernel


def tile_codes(codes):
    """(out, npos) codes -> (nt, out, LUT_TILE), same dtype, nt = ceil(npos / LUT_TILE): tile j holds
    the codes of positions j*P .. j*P+P-1 of every row (P = LUT_TILE), contiguous per row,
    tiles one after the other; positions past npos get code 0 (their tables are 0)."""
    out, npos = codes.shape
    nt = -(-npos // LUT_TILE)
    padded = np.zeros((out, nt * LUT_TILE), codes.dtype)
    padded[:, :npos] = codes
    return np.ascontiguousarray(padded.reshape(out, nt, LUT_TILE).transpose(1, 0, 2))


def _tiled_lut(K):
    """kernel(codes_t, tab, y, rows): y[t, r] += Σ_i tab[t, i, code[r, i]], the table
    lookup shared by CLAQ's byte tables and AQLM's LUT.

    tab (T, nt*P*K) f32, flat: one table of K entries per POSITION i (a byte of CLAQ codes,
    a (group, codebook) pair of AQLM), entry v of table i at i*K + v; codes_t (nt, out, P)
    from tile_codes. Tiles outer, rows inner: a tile's P tables (64 KiB at K = 256,
    P = 64) are read by every row of a block while the codes stream through once, so the
    whole table (1 MiB at 4096 inputs) is swept once per block of rows, not once per row.
    Per row and tile the P lookups are one loop of constant length P, which LLVM unrolls and,
    where its cost model says gathers pay (AVX-512 here), vectorises; P = 32 stays scalar
    and measured 1.7x slower at 4096x4096 (BENCHMARKS.md). The index within the tile,
    i*K + code < P*K, is made an int32 so that the gathers take 16 32-bit indices
    (vgatherdps) rather than 8 64-bit ones (vgatherqps): 0.76-0.80 ms against 0.88. (The
    int32 cast must come before the add: int32(i*K + code) still gave 64-bit indices.)
    Each row's sum runs over the tiles in order, by the one thread owning its block of
    `rows` rows, so y does not depend on `rows` or on the thread count. K (entries per
    table) is a compile-time constant: one kernel per K.
    """
    if K in _TILED_KERNELS:
        return _TILED_KERNELS[K]
    P = LUT_TILE

    @njit(parallel=True, fastmath=_FM)
    def kernel(codes_t, tab, y, rows):
        nt, out, _ = codes_t.shape
        T = tab.shape[0]
        nblk = (out + rows - 1) // rows
        for blk in prange(nblk):
            r0 = blk * rows
            r1 = min(out, r0 + rows)
            acc = np.empty(r1 - r0, np.float32)
            for t in range(T):
                acc[:] = 0.0
                for j in range(nt):
                    L = tab[t, j * P * K:(j + 1) * P * K]      # this tile's P tables, flat
                    cj = codes_t[j]
                    for r in range(r0, r1):
                        c = cj[r]
                        a = np.float32(0.0)
                        for i in range(P):                   # Σ_{i in tile j} tab[t, i, code[r, i]]
                            a += L[np.int32(np.int32(i * K) + np.int32(c[i]))]
                        acc[r - r0] += a
                for r in range(r0, r1):
                    y[t, r] += acc[r - r0]

    _TILED_KERNELS[K] = kernel
    return kernel


def _tiled_rows(out, work):
    """Rows per block of _tiled_lut: one block per thread (a serial product: one block).
    The fewer the blocks, the fewer passes over the table; any split gives the same y."""
    return out if work < PAR_MIN_WORK else max(TILED_MIN_ROWS, -(-out // numba.get_num_threads()))


TILED_MIN_ROWS = 256     # rows per prange item of the tiled LUT kernel: at least this many


def digit_codes(qw, bits, nc):
    """The codes of one width as DIGIT BYTES, cpb = 8 // bits codes per byte (least
    significant first): byte i = Σ_p code[i*cpb + p] << (bits*p), (out, ceil(nc / cpb))
    uint8. At 1, 2, 4 and 8 bits these are the packed bytes themselves; at 3 bits two codes
    per byte (6 bits used), at 5-7 bits one: the packed codes straddle bytes there, and a
    byte per one or two codes is what lets every width use the byte tables."""
    if 8 % bits == 0:
        return qw
    cpb = 8 // bits
    codes = unpack(qw, bits, nc)                                   # (out, nc)
    nd = -(-nc // cpb)
    padded = np.zeros((codes.shape[0], nd * cpb), np.uint8)
    padded[:, :nc] = codes
    digits = np.zeros((codes.shape[0], nd), np.uint8)
    for p in range(cpb):
        digits |= padded[:, p::cpb] << np.uint8(bits * p)
    return digits


def _codebook_state(q):
    def build():
        q._validate()
        widths = []
        for b in sorted(q.qweights):
            qw = np.ascontiguousarray(q.qweights[b])
            cols = q.columns(b)
            # the kernel reads a tiled copy of the digit bytes (tile_codes(digit_codes(.)))
            tiled = tile_codes(digit_codes(qw, b, cols.size))
            widths.append((b, qw, tiled, cols, np.ascontiguousarray(q.codebooks[b], dtype=np.float32)))
        return {"widths": widths, "csr": csr_state(q.outliers)}
    key = (q.column_bits, q.outliers) + tuple(q.qweights[b] for b in sorted(q.qweights)) \
        + tuple(q.codebooks[b] for b in sorted(q.codebooks))
    return _cached(q, key, build)


@register("cpu", "codebook")
def codebook_cpu(q, x2):
    """y = Σ_widths Σ_i BT[t, i, digit byte i of row r] (the tiled LUT kernel), + outliers."""
    st = _codebook_state(q)
    T = x2.shape[0]
    out = q.shape[0]
    y = np.zeros((T, out), np.float32)
    for b, _, tiled, cols, C in st["widths"]:
        lut = np.ascontiguousarray(x2[:, cols][:, :, None] * C[None])     # (T, n_b, 2^b)
        K = 1 << (b * (8 // b))                                  # entries per byte table
        bt = np.empty((T, tiled.shape[0] * LUT_TILE, K), np.float32)   # positions past the row add 0
        _byte_tables(b)(lut, bt)
        work = T * out * cols.size
        _run(_tiled_lut(K), work, tiled, bt.reshape(T, -1), y, _tiled_rows(out, work))
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
    for b, qw, _, cols, C in st["widths"]:
        _codebook_rows(qw, C, cols, b, r0, r1, W)
    if st["csr"] is not None:
        _csr_add_rows(W, r0, *st["csr"])
    return W


# =========================================================================== additive (AQLM)
_DIRECT_KERNELS = {}     # (M, g) -> compiled kernel


def _additive_direct(M, g):
    """Codebooks too large for a LUT (B > 8): kernel(codes, C, s, x, y),
    y[t, r] = s[r] Σ_k Σ_j (Σ_m C_m[code[r, k, m], j]) x[t, k*g + j].
    M and g are compile-time constants (one kernel per (M, g)): the group's g-wide dot
    product unrolls and vectorises, 3.4x faster at 1x16 g8 4096x4096 than with runtime
    M and g (32.7 -> 9.5 ms; the codebook, 2 MiB at 2^16 x 8, is read at random)."""
    if (M, g) in _DIRECT_KERNELS:
        return _DIRECT_KERNELS[M, g]

    @njit(parallel=True, fastmath=_FM)
    def kernel(codes, C, s, x, y):
        out, Kg, _ = codes.shape
        T = x.shape[0]
        for r in prange(out):
            for t in range(T):
                a = np.float32(0.0)
                for k in range(Kg):
                    ak = np.float32(0.0)
                    for j in range(g):
                        w = np.float32(0.0)
                        for m in range(M):                   # W_hat / s = Σ_m C_m[code]
                            w += C[m, codes[r, k, m], j]
                        ak += w * x[t, k * g + j]
                    a += ak
                y[t, r] = s[r] * a

    _DIRECT_KERNELS[M, g] = kernel
    return kernel


def _additive_state(q):
    def build():
        q._validate()
        out, Kg, M = q.codes.shape
        K = q.codebooks.shape[1]
        use_lut = Kg * M * K <= ADDITIVE_LUT_MAX
        # the LUT kernel reads the codes as positions k*M + m, tiled (tile_codes: same bytes)
        codes = tile_codes(q.codes.reshape(out, Kg * M)) if use_lut else np.ascontiguousarray(q.codes)
        return {"lut": use_lut, "codes": codes,
                "C": np.ascontiguousarray(q.codebooks, dtype=np.float32),     # (M, 2^B, g)
                "s": np.ascontiguousarray(q.scales, dtype=np.float32)}
    return _cached(q, (q.codes, q.codebooks, q.scales), build)


def additive_table(x2, C, npos=None):
    """LUT[t, k*M + m, j] = x[t, k-th group] · C_m[j]: one small GEMM per call.
    x2 (T, in) f32, C (M, 2^B, g) f32 -> (T, npos, 2^B) f32, contiguous; npos >= in/g * M
    (default equal), the positions past in/g * M are 0 (the padding of tile_codes)."""
    T = x2.shape[0]
    M, K, g = C.shape
    Kg = x2.shape[1] // g
    lut = (x2.reshape(T * Kg, g) @ C.reshape(M * K, g).T).reshape(T, Kg * M, K)
    if npos is None or npos == Kg * M:
        return np.ascontiguousarray(lut, dtype=np.float32)
    padded = np.zeros((T, npos, K), np.float32)
    padded[:, :Kg * M] = lut
    return padded


# LUT entries per token above which the direct kernel is used instead
ADDITIVE_LUT_MAX = 1 << 22


@register("cpu", "additive")
def additive_cpu(q, x2):
    """y[t, r] = s[r] Σ_k Σ_m LUT[t, k*M + m, code[r, k, m]] (the tiled LUT kernel), or the
    direct kernel for codebooks too large to tabulate."""
    st = _additive_state(q)
    out, n = q.shape
    T = x2.shape[0]
    C = st["C"]
    if st["lut"]:
        codes = st["codes"]                                  # (nt, out, LUT_TILE)
        lut = additive_table(x2, C, codes.shape[0] * LUT_TILE)
        y = np.zeros((T, out), np.float32)
        work = T * out * n
        _run(_tiled_lut(C.shape[1]), work, codes, lut.reshape(T, -1), y, _tiled_rows(out, work))
        y *= st["s"]
    else:
        y = np.empty((T, out), np.float32)
        _run(_additive_direct(C.shape[0], C.shape[2]), T * out * n, st["codes"], C, st["s"], x2, y)
    return y


# =========================================================================== row_lut (SqueezeLLM)
# Units per chunk of the row_lut kernel (compile-time constants): 64 byte units (1, 2, 4, 8
# bits), 32 wider units (3, 5, 6, 7 bits). LLVM's vectorisation of the chunk loop depends on
# its length, erratically: at 4096x4096 4 bits ran 2.7 ms with 64, 3.8-9 ms with 16 or 32;
# 3 bits 2.9-3.1 ms with 32, 3.4 with 64 (BENCHMARKS.md, 2026-12-01).
ROW_LUT_CHUNK = {1: 64, 3: 32, 5: 32, 7: 32}             # unit bytes -> units per chunk
_ROW_LUT_KERNELS = {}    # bits -> compiled kernel


def _row_lut(bits):
    """kernel(qw, lut, xp, y): y[t, r] = Σ_c lut[r, code[r, c]] x[t, c] (SqueezeLLM's per-row
    table), the weight looked up per code and multiplied by x: no float weight is stored.

    The packed row is read in units (unit_geometry: 1 byte = 2 codes at 4 bits, 3 bytes
    = 8 codes at 3 bits), code p of unit u multiplying the plane xp[t, p, u] = x[t, u*cpu + p]
    as in the uniform kernel; the units go in chunks of ROW_LUT_CHUNK[ub] units, a loop of
    constant length that LLVM unrolls and vectorises, the lookups lut[r, code] becoming gathers from
    the row's 2^b-entry table (in L1; vgatherqps on AVX-512). The previous kernel summed x
    into one bucket per code (acc[code] += x, a scalar chain through memory) and then took
    lut[r] . acc: 0.15-0.2x the fp32 GEMV at 4096x4096 against ~1.5x for this one.
    Each y[t, r] is summed chunk by chunk, in order, by the thread owning row r.
    """
    if bits in _ROW_LUT_KERNELS:
        return _ROW_LUT_KERNELS[bits]
    ub, cpu = unit_geometry(bits)
    mask = (1 << bits) - 1
    word, WT = _unit_reader(ub)
    H = ROW_LUT_CHUNK[ub]

    @njit(fastmath=_FM)
    def row_dot(row, L, xp, t):
        """Σ_u Σ_p L[code p of unit u] xp[t, p, u] for one row, whole chunks, then the rest."""
        nu = xp.shape[2]
        M = WT(mask)
        nfull = nu // H
        tot = np.float32(0.0)
        for ch in range(nfull):
            u0 = ch * H
            a = np.float32(0.0)
            if ub == 1:
                # byte units (1, 2, 4, 8 bits): one plane at a time, each its own vector chain
                for p in range(cpu):
                    ap = np.float32(0.0)
                    for k in range(H):
                        ap += L[(WT(row[u0 + k]) >> WT(bits * p)) & M] * xp[t, p, u0 + k]
                    a += ap
            else:
                for k in range(H):                      # constant trip count: vectorised
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        a += L[(v >> WT(bits * p)) & M] * xp[t, p, u0 + k]
            tot += a
        for u in range(nfull * H, nu):                  # the last, shorter chunk
            v = word(row, u)
            for p in range(cpu):
                tot += L[(v >> WT(bits * p)) & M] * xp[t, p, u]
        return tot

    @njit(fastmath=_FM)
    def row_dot4(row, L, xp, t):
        """y[t:t+4, r]: tokens four at a time, each code looked up once for four products."""
        nu = xp.shape[2]
        M = WT(mask)
        nfull = nu // H
        y0 = np.float32(0.0)
        y1 = np.float32(0.0)
        y2 = np.float32(0.0)
        y3 = np.float32(0.0)
        for ch in range(nfull + 1):
            u0 = ch * H
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            if ch < nfull:
                for k in range(H):                      # constant trip count: vectorised
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        w = L[(v >> WT(bits * p)) & M]
                        a0 += w * xp[t, p, u0 + k]
                        a1 += w * xp[t + 1, p, u0 + k]
                        a2 += w * xp[t + 2, p, u0 + k]
                        a3 += w * xp[t + 3, p, u0 + k]
            else:                                       # the last, shorter chunk
                for k in range(nu - u0):
                    v = word(row, u0 + k)
                    for p in range(cpu):
                        w = L[(v >> WT(bits * p)) & M]
                        a0 += w * xp[t, p, u0 + k]
                        a1 += w * xp[t + 1, p, u0 + k]
                        a2 += w * xp[t + 2, p, u0 + k]
                        a3 += w * xp[t + 3, p, u0 + k]
            y0 += a0
            y1 += a1
            y2 += a2
            y3 += a3
        return y0, y1, y2, y3

    @njit(parallel=True, fastmath=_FM)
    def kernel(qw, lut, xp, y):
        out = qw.shape[0]
        T = xp.shape[0]
        T4 = T - T % 4
        nblk = (out + ROW_BLOCK - 1) // ROW_BLOCK
        for blk in prange(nblk):
            for r in range(blk * ROW_BLOCK, min(out, blk * ROW_BLOCK + ROW_BLOCK)):
                for t in range(0, T4, 4):
                    y[t, r], y[t + 1, r], y[t + 2, r], y[t + 3, r] = row_dot4(qw[r], lut[r], xp, t)
                for t in range(T4, T):              # the remaining tokens one at a time
                    y[t, r] = row_dot(qw[r], lut[r], xp, t)

    kernel.row_functions = {"row_lut": row_dot, "row_lut x4": row_dot4}     # asm checks
    _ROW_LUT_KERNELS[bits] = kernel
    return kernel


def _row_lut_state(q):
    def build():
        out, n = q.shape
        ub, cpu = unit_geometry(q.bits)
        nu = -(-n // cpu)
        qw = np.ascontiguousarray(q.qweight)
        if nu * ub > qw.shape[1]:           # the row ends inside a unit: zero-padded copy
            qw = np.concatenate([qw, np.zeros((out, nu * ub - qw.shape[1]), np.uint8)], axis=1)
        return {"qw": qw, "cpu": cpu, "nu": nu,
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
    out, n = q.shape
    T = x2.shape[0]
    cpu, nu = st["cpu"], st["nu"]
    xs = x2 if nu * cpu == n else np.concatenate([x2, np.zeros((T, nu * cpu - n), np.float32)], axis=1)
    xp = np.ascontiguousarray(xs.reshape(T, nu, cpu).transpose(0, 2, 1))       # (T, cpu, nu)
    y = np.empty((T, out), np.float32)
    _run(_row_lut(q.bits), T * out * n, st["qw"], st["lut"], xp, y)
    return add_outliers(y, x2, st["csr"])
