// "uniform" / "uniform_sparse": W_hat[r, c] = s[r, c / g] (q[r, c] - z[r, c / g]) (+ CSR S).
//
// Grid (ceil(out / WARPS), T), block (32, WARPS): warp = one (row, token).
// Lane l takes stored columns c = l, l + 32, ...: decodes the code from the
// packed row, dequantizes it exactly as refq does (fp32 s * (q - z)) and
// multiplies by x_s[t, c] (x in STORED column order, i.e. x[:, perm] when the
// weight has an act-order perm; x_o is x in original order for the CSR).
#include "common.cuh"

template <typename T>
__device__ void uniform_body(const u8* __restrict__ qw, const float* __restrict__ s,
                             const float* __restrict__ z, const T* __restrict__ xs,
                             const T* __restrict__ xo, const int* rowptr, const int* cols,
                             const float* vals, T* __restrict__ y, int out, int n, int nb,
                             int G, int g, int bits, int has_csr) {
    int lane = threadIdx.x;
    int row = blockIdx.x * WARPS + threadIdx.y;
    int t = blockIdx.y;
    if (row >= out) return;                      // whole warp leaves together
    const u8* q = qw + (long)row * nb;
    const T* xt = xs + (long)t * n;
    const float* sr = s + (long)row * G;
    const float* zr = z + (long)row * G;
    float acc = 0.f;
    for (int c = lane; c < n; c += 32) {
        int gi = c / g;
        float w = sr[gi] * ((float)code_at(q, c, bits, nb) - zr[gi]);
        acc += w * ldx(xt, c);
    }
    if (has_csr) acc += csr_lane(rowptr, cols, vals, xo + (long)t * n, row, lane);
    acc = warp_sum(acc);
    if (lane == 0) stx(y, (long)t * out + row, acc);
}

extern "C" __global__ void uniform_f32(const u8* qw, const float* s, const float* z,
                                       const float* xs, const float* xo, const int* rowptr,
                                       const int* cols, const float* vals, float* y, int out,
                                       int n, int nb, int G, int g, int bits, int has_csr) {
    uniform_body<float>(qw, s, z, xs, xo, rowptr, cols, vals, y, out, n, nb, G, g, bits, has_csr);
}

extern "C" __global__ void uniform_f16(const u8* qw, const float* s, const float* z,
                                       const __half* xs, const __half* xo, const int* rowptr,
                                       const int* cols, const float* vals, __half* y, int out,
                                       int n, int nb, int G, int g, int bits, int has_csr) {
    uniform_body<__half>(qw, s, z, xs, xo, rowptr, cols, vals, y, out, n, nb, G, g, bits, has_csr);
}
