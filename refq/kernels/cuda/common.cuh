// Shared helpers of refq's CUDA kernels (included by every .cu file).
//
// Layout shared by all kernels: blockDim = (32, WARPS); one WARP computes one
// output element y[t, row]: row = blockIdx.x * WARPS + threadIdx.y, token
// t = blockIdx.y. Lane l sums the terms l, l + 32, l + 64, ... of the row in
// that order, then warp_sum adds the 32 partial sums by a fixed shuffle tree,
// so results do not depend on scheduling (no atomics anywhere).
// refq/kernels/gpu_mirror.py repeats this decomposition in numpy.
#pragma once
#include <cuda_fp16.h>

#define WARPS 4

typedef unsigned char u8;
typedef unsigned short u16;

__device__ __forceinline__ float ldx(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ldx(const __half* p, long i) { return __half2float(p[i]); }
__device__ __forceinline__ void stx(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void stx(__half* p, long i, float v) { p[i] = __float2half(v); }

// Sum of v over the 32 lanes; the result is complete in lane 0.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Code k of a packed row of nb bytes (FORMAT.md bit order: little-endian
// bitstream, code k at bits [k*bits, (k+1)*bits)); bits in 1..8.
__device__ __forceinline__ unsigned code_at(const u8* row, long k, int bits, int nb) {
    long bit = k * bits;
    long i = bit >> 3;
    unsigned v = row[i];
    if (i + 1 < nb) v |= ((unsigned)row[i + 1]) << 8;
    return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

// Lane's share of row r of a CSR matrix times x (one token, original column order).
template <typename T>
__device__ __forceinline__ float csr_lane(const int* rowptr, const int* cols, const float* vals,
                                          const T* xt, int r, int lane) {
    float a = 0.f;
    for (int e = rowptr[r] + lane; e < rowptr[r + 1]; e += 32) a += vals[e] * ldx(xt, cols[e]);
    return a;
}
