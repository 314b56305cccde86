"""numpy mirrors of the CUDA kernels in refq/kernels/cuda/*.cu.

Each mirror runs the SAME decomposition as its kernel, in Python loops:
the grid (ceil(out / WARPS), T), the warps of a block, the 32 lanes of a warp
and the terms each lane takes (l, l + 32, ...), the shared-memory chunks and
the shuffle tree of warp_sum, all in float32. They are slow (small shapes
only) and exist so that the index arithmetic of the CUDA code is tested on a
machine without a GPU: tests/test_kernels_cuda.py checks every mirror against
x @ q.dequantize().T, and, where a GPU exists, the kernels against the mirrors.
Keep each mirror line-for-line beside its .cu body when either changes.
"""
import numpy as np

WARPS = 4          # common.cuh
F = np.float32


def warp_sum(v):
    """common.cuh warp_sum: v[l] += v[l + o] (o = 16, 8, 4, 2, 1); lane 0's value.

    __shfl_down_sync returns the caller's own value when l + o >= 32.
    """
    v = np.array(v, dtype=F)
    for o in (16, 8, 4, 2, 1):
        src = np.concatenate([v[o:], v[32 - o:]])   # lanes >= 32 - o read their own value
        v = (v + src).astype(F)
    return v[0]


def code_at(row, k, bits, nb):
    bit = k * bits
    i = bit >> 3
    v = int(row[i])
    if i + 1 < nb:
        v |= int(row[i + 1]) << 8
    return (v >> (bit & 7)) & ((1 << bits) - 1)


def _grid(out):
    return (out + WARPS - 1) // WARPS


def csr_lane(rowptr, cols, vals, xt, r, lane):
    a = F(0)
    for e in range(int(rowptr[r]) + lane, int(rowptr[r + 1]), 32):
        a = F(a + F(vals[e]) * F(xt[cols[e]]))
    return a


# --------------------------------------------------------------------------- uniform.cu
def uniform_mirror(qw, s, z, xs, xo, csr, bits, g):
    """qw (out, nb) u8; s, z (out, G) f32; xs (T, in) stored order; xo (T, in) original
    order; csr (rowptr, cols, vals) or None -> y (T, out) f32."""
    out, nb = qw.shape
    T, n = xs.shape
    G = s.shape[1]
    y = np.zeros((T, out), F)
    for bx in range(_grid(out)):
        for t in range(T):                                   # blockIdx.y
            for ty in range(WARPS):
                row = bx * WARPS + ty
                if row >= out:
                    continue
                lanes = np.zeros(32, F)
                for lane in range(32):
                    acc = F(0)
                    for c in range(lane, n, 32):
                        gi = c // g
                        w = F(s[row, gi] * F(F(code_at(qw[row], c, bits, nb)) - z[row, gi]))
                        acc = F(acc + w * F(xs[t, c]))
                    if csr is not None:
                        acc = F(acc + csr_lane(*csr, xo[t], row, lane))
                    lanes[lane] = acc
                y[t, row] = warp_sum(lanes)
    return y


# --------------------------------------------------------------------------- codebook.cu
def codebook_chunk(bits, smem_bytes=32768):
    """Columns per shared-memory LUT chunk (host side of codebook.cu)."""
    return max(1, smem_bytes // (4 << bits))


def codebook_width_mirror(qw, cb, cols, x, yf, bits, CH):
    """One launch of codebook_f32: yf (T, out) += Σ_k LUT[k, code] for one width."""
    out, nbb = qw.shape
    T, n = x.shape
    nc = cols.shape[0]
    K = 1 << bits
    cbf = cb.astype(F)
    for bx in range(_grid(out)):
        for t in range(T):
            accs = np.zeros((WARPS, 32), F)
            for c0 in range(0, nc, CH):
                ch = min(CH, nc - c0)
                lut = np.zeros(ch * K, F)                    # shared memory
                for i in range(ch * K):                      # tid-strided fill, any order
                    k, v = divmod(i, K)
                    lut[i] = F(x[t, cols[c0 + k]]) * cbf[c0 + k, v]
                for ty in range(WARPS):
                    row = bx * WARPS + ty
                    if row >= out:
                        continue
                    for lane in range(32):
                        for k in range(lane, ch, 32):
                            accs[ty, lane] = F(accs[ty, lane] + lut[k * K + code_at(qw[row], c0 + k, bits, nbb)])
            for ty in range(WARPS):
                row = bx * WARPS + ty
                if row < out:
                    yf[t, row] = F(yf[t, row] + warp_sum(accs[ty]))


def csr_add_mirror(csr, x, yf):
    out = yf.shape[1]
    for bx in range(_grid(out)):
        for t in range(x.shape[0]):
            for ty in range(WARPS):
                row = bx * WARPS + ty
                if row < out:
                    yf[t, row] = F(yf[t, row] + warp_sum([csr_lane(*csr, x[t], row, l)
                                                          for l in range(32)]))


def codebook_mirror(q, x):
    """The host sequence of gpu.py for a CodebookWeight: widths ascending, then CSR."""
    T = x.shape[0]
    yf = np.zeros((T, q.shape[0]), F)
    for b in sorted(q.qweights):
        cols = q.columns(b).astype(np.int32)
        codebook_width_mirror(q.qweights[b], q.codebooks[b], cols, x, yf, b, codebook_chunk(b))
    if q.outliers.nnz:
        csr_add_mirror((q.outliers.rowptr, q.outliers.cols.astype(np.int32),
                        q.outliers.values.astype(F)), x, yf)
    return yf


# --------------------------------------------------------------------------- additive.cu
def additive_mirror(codes, cb, s, x):
    """codes (out, Kg, M); cb (M, 2^B, g) f16; s (out,) f32; x (T, in) -> (T, out)."""
    out, Kg, M = codes.shape
    g = cb.shape[2]
    T = x.shape[0]
    scb = cb.astype(F)                                      # shared (or global) codebooks
    y = np.zeros((T, out), F)
    for bx in range(_grid(out)):
        for t in range(T):
            for ty in range(WARPS):
                row = bx * WARPS + ty
                if row >= out:
                    continue
                lanes = np.zeros(32, F)
                for lane in range(32):
                    acc = F(0)
                    for k in range(lane, Kg, 32):
                        part = F(0)
                        for j in range(g):
                            w = F(0)
                            for m in range(M):
                                w = F(w + scb[m, codes[row, k, m], j])
                            part = F(part + w * F(x[t, k * g + j]))
                        acc = F(acc + part)
                    lanes[lane] = acc
                y[t, row] = F(s[row] * warp_sum(lanes))
    return y
