// "codebook" (CLAQ): one codebook per column; columns of one width b stored together.
//
// One launch per width b (ascending), each ADDING into a float32 buffer
// yf (T, out) that the host zeroes first; then csr_add_f32/f16 for the
// outliers (same launch layout; see csr.cu-style kernel below).
//
// Grid (ceil(out / WARPS), T), block (32, WARPS). The block walks the
// columns of width b in chunks of CH; for each chunk it builds the LUT
//     lut[k * K + v] = x[t, cols[c0 + k]] * C[c0 + k][v]     (K = 2^b)
// in SHARED memory (CH * K floats, dynamic), syncs, and every warp adds
//     lut[k * K + code[row, c0 + k]]   for k = lane, lane + 32, ... < ch.
// CH is chosen by the host so that CH * K * 4 bytes <= 32 KiB.
#include "common.cuh"

template <typename T>
__device__ void codebook_body(const u8* __restrict__ qw, const __half* __restrict__ cb,
                              const int* __restrict__ cols, const T* __restrict__ x,
                              float* __restrict__ yf, int out, int n, int nc, int nbb,
                              int bits, int CH) {
    extern __shared__ float lut[];
    int lane = threadIdx.x;
    int tid = threadIdx.y * 32 + lane;
    int row = blockIdx.x * WARPS + threadIdx.y;
    int t = blockIdx.y;
    int K = 1 << bits;
    const T* xt = x + (long)t * n;
    const u8* q = qw + (long)(row < out ? row : 0) * nbb;
    float acc = 0.f;
    for (int c0 = 0; c0 < nc; c0 += CH) {
        int ch = min(CH, nc - c0);
        __syncthreads();                         // previous chunk fully used
        for (int i = tid; i < ch * K; i += 32 * WARPS) {
            int k = i / K, v = i - k * K;
            lut[i] = ldx(xt, cols[c0 + k]) * __half2float(cb[(long)(c0 + k) * K + v]);
        }
        __syncthreads();
        if (row < out)
            for (int k = lane; k < ch; k += 32) acc += lut[k * K + code_at(q, c0 + k, bits, nbb)];
    }
    acc = warp_sum(acc);
    if (row < out && lane == 0) yf[(long)t * out + row] += acc;
}

extern "C" __global__ void codebook_f32(const u8* qw, const __half* cb, const int* cols,
                                        const float* x, float* yf, int out, int n, int nc,
                                        int nbb, int bits, int CH) {
    codebook_body<float>(qw, cb, cols, x, yf, out, n, nc, nbb, bits, CH);
}

extern "C" __global__ void codebook_f16(const u8* qw, const __half* cb, const int* cols,
                                        const __half* x, float* yf, int out, int n, int nc,
                                        int nbb, int bits, int CH) {
    codebook_body<__half>(qw, cb, cols, x, yf, out, n, nc, nbb, bits, CH);
}

// yf[t, r] += Σ_e vals[e] x[t, cols[e]] over row r's CSR entries (warp per row).
template <typename T>
__device__ void csr_body(const int* rowptr, const int* cols, const float* vals, const T* x,
                         float* yf, int out, int n) {
    int lane = threadIdx.x;
    int row = blockIdx.x * WARPS + threadIdx.y;
    int t = blockIdx.y;
    if (row >= out) return;
    float acc = warp_sum(csr_lane(rowptr, cols, vals, x + (long)t * n, row, lane));
    if (lane == 0) yf[(long)t * out + row] += acc;
}

extern "C" __global__ void csr_add_f32(const int* rowptr, const int* cols, const float* vals,
                                       const float* x, float* yf, int out, int n) {
    csr_body<float>(rowptr, cols, vals, x, yf, out, n);
}

extern "C" __global__ void csr_add_f16(const int* rowptr, const int* cols, const float* vals,
                                       const __half* x, float* yf, int out, int n) {
    csr_body<__half>(rowptr, cols, vals, x, yf, out, n);
}
