// Device helpers shared by the per-pixel attribute kernels of interpolate.cu and rasterize.cu
// (interpolation of per-vertex attributes with barycentrics, and its backward). fastface's kernel
// loader pastes this file in place of its #include line, so that CuPy's compile cache, which keys on
// the source text, sees a change here; nvcc (the compile test) reads it as a normal header.
#pragma once

// C > 0: that many channels, known at compile time; C == -1: n_ch channels at run time.
template <int C>
__device__ __forceinline__ int channels(int n_ch) {
    return C > 0 ? C : n_ch;
}

// The vertices (i0, i1, i2) of triangle t, and whether t and all three are in range: memory safety
// does not rely on the Python checks, which can be turned off. t is compared as unsigned, so one
// compare also catches a negative id (-1 marks an empty pixel).
__device__ __forceinline__ bool triangle_corners(const int* __restrict__ tri, unsigned int t, int T, int V, int& i0,
                                                 int& i1, int& i2) {
    if (t >= (unsigned int)T) return false;
    i0 = tri[3LL * t];
    i1 = tri[3LL * t + 1];
    i2 = tri[3LL * t + 2];
    return i0 >= 0 && i0 < V && i1 >= 0 && i1 < V && i2 >= 0 && i2 < V;
}

// Vector atomics: one L2 operation for 2 or 4 floats on sm_90 and later (the address must be
// 8- or 16-byte aligned), one per float before.
__device__ __forceinline__ void atomic_add4(float4* g, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(g, v);
#else
    atomicAdd(&g->x, v.x);
    atomicAdd(&g->y, v.y);
    atomicAdd(&g->z, v.z);
    atomicAdd(&g->w, v.w);
#endif
}

__device__ __forceinline__ void atomic_add2(float2* g, float2 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(g, v);
#else
    atomicAdd(&g->x, v.x);
    atomicAdd(&g->y, v.y);
#endif
}

// Adds u g, v g, (1-u-v) g to the attribute gradients of the triangle's three vertices, one vector
// atomic each: float4 rows (3 or 4 channels; the caller drops the 4th column for 3) or float2 rows
// (VEC_WIDTH 2). Products with a zero gradient are left out (as zeros), like the scalar path's skip,
// so that a non-finite weight times 0 cannot reach the sums.
template <int VEC_WIDTH>
__device__ __forceinline__ void scatter_weighted_vector(float* grad_attr, long long vbase, int i0, int i1, int i2,
                                                        const float (&g)[4], float u, float v, float w2) {
    float g0[4], g1[4], g2[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        g0[c] = g[c] != 0.0f ? u * g[c] : 0.0f;
        g1[c] = g[c] != 0.0f ? v * g[c] : 0.0f;
        g2[c] = g[c] != 0.0f ? w2 * g[c] : 0.0f;
    }
    if (VEC_WIDTH == 4) {
        float4* ga = reinterpret_cast<float4*>(grad_attr) + vbase;
        atomic_add4(ga + i0, make_float4(g0[0], g0[1], g0[2], g0[3]));
        atomic_add4(ga + i1, make_float4(g1[0], g1[1], g1[2], g1[3]));
        atomic_add4(ga + i2, make_float4(g2[0], g2[1], g2[2], g2[3]));
    } else {
        float2* ga = reinterpret_cast<float2*>(grad_attr) + vbase;
        atomic_add2(ga + i0, make_float2(g0[0], g0[1]));
        atomic_add2(ga + i1, make_float2(g1[0], g1[1]));
        atomic_add2(ga + i2, make_float2(g2[0], g2[1]));
    }
}

// The scalar path of the interpolation backward for any channel count: accumulates the barycentric
// gradient (gu, gv) = sum_c g_c (a0_c - a2_c, a1_c - a2_c) and adds u g, v g, (1-u-v) g to the
// attribute gradient rows by scalar atomics, skipping zero gradients.
__device__ __forceinline__ void interpolate_grads_scalar(const float* a0, const float* a1, const float* a2,
                                                         const float* go, float* grad_attr, long long vbase, int i0,
                                                         int i1, int i2, int nc, float u, float v, float w2,
                                                         float& gu, float& gv) {
    float* ga0 = grad_attr + (vbase + i0) * nc;
    float* ga1 = grad_attr + (vbase + i1) * nc;
    float* ga2 = grad_attr + (vbase + i2) * nc;
#pragma unroll
    for (int c = 0; c < nc; ++c) {
        float g = go[c];
        gu += g * (a0[c] - a2[c]);
        gv += g * (a1[c] - a2[c]);
        if (g != 0.0f) {
            atomicAdd(ga0 + c, u * g);
            atomicAdd(ga1 + c, v * g);
            atomicAdd(ga2 + c, w2 * g);
        }
    }
}
