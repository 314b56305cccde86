// "additive" (AQLM): W_hat[r, k*g:(k+1)*g] = s[r] * Σ_m C_m[code[r, k, m]].
//
// Grid (ceil(out / WARPS), T), block (32, WARPS). The block first copies the
// codebooks (M * 2^B * g values, as float) into SHARED memory when they fit
// (use_smem = 1: the 2x8 case, 16 KiB); otherwise (1x16: 65536 * g values)
// they are read from global memory (L2), as AQLM's own 1x16 kernel does.
// Lane l takes the groups k = l, l + 32, ...; per group the M codewords are
// summed in order m = 0..M-1 (as refq.dequantize does), dotted with
// x[t, k*g:(k+1)*g]; the row total is multiplied by s[r] at the end.
#include "common.cuh"

template <typename T, typename C>
__device__ void additive_body(const C* __restrict__ codes, const __half* __restrict__ cb,
                              const float* __restrict__ s, const T* __restrict__ x,
                              T* __restrict__ y, int out, int Kg, int M, int B, int g,
                              int use_smem) {
    extern __shared__ float scb[];
    int lane = threadIdx.x;
    int tid = threadIdx.y * 32 + lane;
    int row = blockIdx.x * WARPS + threadIdx.y;
    int t = blockIdx.y;
    long ncb = (long)M * (1L << B) * g;
    if (use_smem) {
        for (long i = tid; i < ncb; i += 32 * WARPS) scb[i] = __half2float(cb[i]);
        __syncthreads();
    }
    if (row >= out) return;
    int n = Kg * g;
    const T* xt = x + (long)t * n;
    const C* cr = codes + (long)row * Kg * M;
    float acc = 0.f;
    for (int k = lane; k < Kg; k += 32) {
        float part = 0.f;
        for (int j = 0; j < g; j++) {
            float w = 0.f;
            for (int m = 0; m < M; m++) {
                long off = ((long)m * (1L << B) + cr[(long)k * M + m]) * g + j;
                w += use_smem ? scb[off] : __half2float(cb[off]);
            }
            part += w * ldx(xt, (long)k * g + j);
        }
        acc += part;
    }
    acc = warp_sum(acc);
    if (lane == 0) stx(y, (long)t * out + row, s[row] * acc);
}

#define ADDITIVE(name, T, C)                                                              \
    extern "C" __global__ void name(const C* codes, const __half* cb, const float* s,      \
                                    const T* x, T* y, int out, int Kg, int M, int B, int g, \
                                    int use_smem) {                                         \
        additive_body<T, C>(codes, cb, s, x, y, out, Kg, M, B, g, use_smem);                \
    }

ADDITIVE(additive_u8_f32, float, u8)
ADDITIVE(additive_u8_f16, __half, u8)
ADDITIVE(additive_u16_f32, float, u16)
ADDITIVE(additive_u16_f16, __half, u16)
