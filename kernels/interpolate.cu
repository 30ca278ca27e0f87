// Interpolation kernels: interpolate_fwd<C> and interpolate_bwd<C>. The Numba twins live in
// fastface/ops/interpolate.py. C > 0: that many channels, known at compile time so the channel
// loop unrolls and the attribute loads are independent; C == -1: n_ch channels at run time.
// Compiled with --fmad=false so that the weighted sums round like the Numba code.
// Triangle and vertex indices are tested before any load (the Python checks can be turned off).

#include "pixel_attributes.cuh"

// Per-pixel kernels run on a 2-D grid: x over the H*W pixels of an image (blocks of 256, so a warp
// reads 32 consecutive tri_id and bary entries and writes 32 consecutive output pixels), y over
// images (a strided loop past 65535 images), so no thread divides a 64-bit index.
#define PIXEL_LOOP                                                 \
    int q = blockIdx.x * blockDim.x + threadIdx.x;                 \
    int hw = H * W;                                                \
    if (q >= hw) return;                                           \
    for (int b = blockIdx.y; b < B; b += gridDim.y)

// out = u a0 + v a1 + (1-u-v) a2 at one pixel; zeros where the pixel is empty.
template <int C>
__device__ __forceinline__ void interp_pixel(const float* __restrict__ attr, const int* __restrict__ tri_id,
                                             const float2* __restrict__ bary, const int* __restrict__ tri, int V,
                                             int T, int nc, int attr_batched, float* __restrict__ out, int b,
                                             long long p) {
    float* o = out + p * nc;
    int i0, i1, i2;
    if (!triangle_corners(tri, tri_id[p], T, V, i0, i1, i2)) {
        for (int c = 0; c < nc; ++c) o[c] = 0.0f;
        return;
    }
    float2 uv = bary[p];
    float w2 = (1.0f - uv.x) - uv.y;
    const float* ab = attr + (attr_batched ? (long long)b * V * nc : 0LL);
    const float* a0 = ab + (long long)i0 * nc;
    const float* a1 = ab + (long long)i1 * nc;
    const float* a2 = ab + (long long)i2 * nc;
#pragma unroll
    for (int c = 0; c < nc; ++c) o[c] = (uv.x * a0[c] + uv.y * a1[c]) + w2 * a2[c];
}

// One thread per pixel (see PIXEL_LOOP).
template <int C>
__global__ void interpolate_fwd(const float* __restrict__ attr, const int* __restrict__ tri_id,
                                const float2* __restrict__ bary, const int* __restrict__ tri, int B, int V, int T,
                                int H, int W, int n_ch, int attr_batched, float* __restrict__ out) {
    int nc = channels<C>(n_ch);
    PIXEL_LOOP {
        interp_pixel<C>(attr, tri_id, bary, tri, V, T, nc, attr_batched, out, b, (long long)b * hw + q);
    }
}

// grad_bary = (sum_c g_c (a0_c - a2_c), sum_c g_c (a1_c - a2_c)) is written per pixel; grad_attr
// receives u g, v g, (1-u-v) g by atomicAdd. With C = 3 or 4 channels grad_attr is a (..., V, 4)
// buffer and each vertex takes one float4 atomic instead of C scalar ones (the caller drops the
// 4th column when C = 3). Products with a zero gradient are left out (as zeros) on both paths, so
// that a non-finite weight times 0 cannot reach the sums.
template <int C>
__device__ __forceinline__ void interp_bwd_pixel(const float* __restrict__ attr, const int* __restrict__ tri_id,
                                                 const float2* __restrict__ bary, const int* __restrict__ tri,
                                                 const float* __restrict__ grad_out, int V, int T, int nc,
                                                 int attr_batched, float* __restrict__ grad_attr,
                                                 float2* __restrict__ grad_bary, int b, long long p) {
    int i0, i1, i2;
    if (!triangle_corners(tri, tri_id[p], T, V, i0, i1, i2)) {
        grad_bary[p] = make_float2(0.0f, 0.0f);
        return;
    }
    float2 uv = bary[p];
    float w2 = (1.0f - uv.x) - uv.y;
    long long vbase = attr_batched ? (long long)b * V : 0LL;
    const float* a0 = attr + (vbase + i0) * nc;
    const float* a1 = attr + (vbase + i1) * nc;
    const float* a2 = attr + (vbase + i2) * nc;
    const float* go = grad_out + p * nc;
    float gu = 0.0f, gv = 0.0f;
    if (C == 3 || C == 4) {
        float g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int c = 0; c < C; ++c) {
            g[c] = go[c];
            gu += g[c] * (a0[c] - a2[c]);
            gv += g[c] * (a1[c] - a2[c]);
        }
        scatter_weighted_vector<4>(grad_attr, vbase, i0, i1, i2, g, uv.x, uv.y, w2);
    } else {
        interpolate_grads_scalar(a0, a1, a2, go, grad_attr, vbase, i0, i1, i2, nc, uv.x, uv.y, w2, gu, gv);
    }
    grad_bary[p] = make_float2(gu, gv);
}

// One thread per pixel (see PIXEL_LOOP); grad_attr is a cupy.zeros buffer ((..., V, 4) for 3 or 4
// channels) that receives atomics, since neighbouring pixels, and with unbatched attributes every
// image, share vertices.
template <int C>
__global__ void interpolate_bwd(const float* __restrict__ attr, const int* __restrict__ tri_id,
                                const float2* __restrict__ bary, const int* __restrict__ tri,
                                const float* __restrict__ grad_out, int B, int V, int T, int H, int W, int n_ch,
                                int attr_batched, float* __restrict__ grad_attr, float2* __restrict__ grad_bary) {
    int nc = channels<C>(n_ch);
    PIXEL_LOOP {
        interp_bwd_pixel<C>(attr, tri_id, bary, tri, grad_out, V, T, nc, attr_batched, grad_attr, grad_bary, b,
                            (long long)b * hw + q);
    }
}
