// Spherical-harmonics vertex shading (the SH layout of docs/conventions.md), plain (sh_shade_*) and fused with the
// vertex normals (shade_vertices_*); the Numba twins are in fastface/ops/shading.py (same names,
// same argument order, plus B and V here).
//
// Layout: vertices, normals, colours and gradients (B, V, 3) float32; albedo (B, V, 3), or (V, 3)
// shared by the batch when SHARED_ALBEDO; sh and grad_sh (B, 9, 3); offsets (V + 1) and corners
// (E, 2) int32, the CSR vertex->triangle adjacency of fastface.ops.normals. All C-contiguous.
// E_c = sum_k K_k sh[k, c] P_k(n), with P_k the bare basis polynomials (1, y, z, x, xy, yz,
// 3z^2 - 1, xz, x^2 - y^2) and K_k = A_l(k) c_k.
//
// Launch shape (all kernels): grid (blocks over V, B), blocks of 256 threads (at least 27, and a
// multiple of 32). A block serves one batch element, so its 27 lighting coefficients K_k sh[k, c]
// are loaded once into shared memory and read by every thread as a broadcast. The backward
// kernels loop over about 8 vertices per thread (grid-stride within the batch element, so reads
// stay coalesced) and reduce their 27 grad_sh sums once per block.
//
// Tried and removed: "staged" variants that moved the (B, V, 3) arrays through shared-memory tiles
// (contiguous global accesses) measured slower on an H200 (64 x 35,721 vertices: sh_shade forward
// 42.6 vs 28.6 us, backward 124 vs 45.8 us).

// K_k = A_l(k) * c_k: fastface.ops.shading.SH_BAND_FACTORS in float32.
__constant__ float kBandFactor[9] = {
    0.8862269254527579f,   // pi * 1 / (2 sqrt(pi))
    1.0233267079464883f,   // 2 pi / 3 * sqrt(3) / (2 sqrt(pi))
    1.0233267079464883f,
    1.0233267079464883f,
    0.8580855308097834f,   // pi / 4 * sqrt(15) / (2 sqrt(pi))
    0.8580855308097834f,
    0.24770795610037571f,  // pi / 4 * sqrt(5) / (4 sqrt(pi))
    0.8580855308097834f,
    0.4290427654048917f,   // pi / 4 * sqrt(15) / (4 sqrt(pi))
};

// Fills coef[3k + c] = K_k sh[b, k, c] from the first 27 threads; every thread must call it.
__device__ __forceinline__ void load_coefficients(const float* __restrict__ sh, int b, float* coef) {
    if (threadIdx.x < 27) coef[threadIdx.x] = sh[b * 27 + threadIdx.x] * kBandFactor[threadIdx.x / 3];
    __syncthreads();
}

__device__ __forceinline__ void sh_basis(float x, float y, float z, float p[9]) {
    p[0] = 1.f;
    p[1] = y;
    p[2] = z;
    p[3] = x;
    p[4] = x * y;
    p[5] = y * z;
    p[6] = 3.f * z * z - 1.f;
    p[7] = x * z;
    p[8] = x * x - y * y;
}

// out_c = albedo_c E_c at normal (x, y, z).
__device__ __forceinline__ void shade_vertex(const float* coef, float x, float y, float z,
                                             const float* __restrict__ albedo, float* __restrict__ out) {
    float p[9];
    sh_basis(x, y, z, p);
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        float e = 0.f;
#pragma unroll
        for (int k = 0; k < 9; ++k) e += coef[3 * k + c] * p[k];
        out[c] = albedo[c] * e;
    }
}

// Backward at one vertex: adds ga_c P_k to acc[3k + c], writes (or, for a shared albedo, adds
// atomically; with accumulate, adds) g_c E_c to grad_albedo, and writes grad_n.
template <bool SHARED_ALBEDO>
__device__ __forceinline__ void shade_vertex_bwd(const float* coef, float x, float y, float z,
                                                 const float* __restrict__ albedo, const float* __restrict__ grad,
                                                 float acc[27], float* __restrict__ grad_albedo, float gn[3],
                                                 int accumulate) {
    float p[9], w[9];
    sh_basis(x, y, z, p);
#pragma unroll
    for (int k = 0; k < 9; ++k) w[k] = 0.f;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        const float g = grad[c];
        const float ga = g * albedo[c];
        float e = 0.f;
#pragma unroll
        for (int k = 0; k < 9; ++k) {
            e += coef[3 * k + c] * p[k];
            w[k] += ga * coef[3 * k + c];
            acc[3 * k + c] += ga * p[k];
        }
        if (SHARED_ALBEDO) {
            atomicAdd(grad_albedo + c, g * e);
        } else if (accumulate) {
            grad_albedo[c] += g * e;
        } else {
            grad_albedo[c] = g * e;
        }
    }
    gn[0] = w[3] + w[4] * y + w[7] * z + 2.f * w[8] * x;
    gn[1] = w[1] + w[4] * x + w[5] * z - 2.f * w[8] * y;
    gn[2] = w[2] + w[5] * y + 6.f * w[6] * z + w[7] * x;
}

// Adds K_k times the block's sum of acc to grad_sh_b (27 floats): warp shuffles, then across the
// warps in shared memory, then one atomicAdd per coefficient. Every thread must call it.
__device__ __forceinline__ void block_add_grad_sh(float acc[27], float* __restrict__ grad_sh_b) {
    __shared__ float warp_sums[32][27];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < 27; ++j) {
        float s = acc[j];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
        if (lane == 0) warp_sums[warp][j] = s;
    }
    __syncthreads();
    if (threadIdx.x < 27) {
        const int n_warps = (blockDim.x + 31) >> 5;
        float s = 0.f;
        for (int w = 0; w < n_warps; ++w) s += warp_sums[w][threadIdx.x];
        atomicAdd(grad_sh_b + threadIdx.x, s * kBandFactor[threadIdx.x / 3]);
    }
}

// The sum of the face normals around vertex v of one batch element (vb: its (V, 3) block); kept
// identical to summed_normal in kernels/normals.cu (each .cu file compiles on its own). Corner
// indices outside [0, V) are skipped.
__device__ __forceinline__ void summed_normal(const float* __restrict__ vb, const int* __restrict__ offsets,
                                              const int* __restrict__ corners, int v, int V, float s[3]) {
    const float px = vb[3 * v], py = vb[3 * v + 1], pz = vb[3 * v + 2];
    s[0] = s[1] = s[2] = 0.f;
    const int end = offsets[v + 1];
    for (int e = offsets[v]; e < end; ++e) {
        const int a = corners[2 * e], c = corners[2 * e + 1];
        if ((unsigned)a >= (unsigned)V || (unsigned)c >= (unsigned)V) continue;
        const float ax = vb[3 * a] - px, ay = vb[3 * a + 1] - py, az = vb[3 * a + 2] - pz;
        const float cx = vb[3 * c] - px, cy = vb[3 * c + 1] - py, cz = vb[3 * c + 2] - pz;
        s[0] += ay * cz - az * cy;
        s[1] += az * cx - ax * cz;
        s[2] += ax * cy - ay * cx;
    }
}

__device__ __forceinline__ float inverse_length(const float s[3]) {
    const float len2 = s[0] * s[0] + s[1] * s[1] + s[2] * s[2];
    return len2 > 0.f ? 1.f / sqrtf(len2) : 0.f;
}

// One thread per vertex v of batch element b = blockIdx.y: albedo_c E_c(normal).
template <bool SHARED_ALBEDO>
__global__ void sh_shade_fwd(const float* __restrict__ normals, const float* __restrict__ albedo,
                             const float* __restrict__ sh, float* __restrict__ out, int B, int V) {
    __shared__ float coef[27];
    const int b = blockIdx.y;
    load_coefficients(sh, b, coef);
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B || v >= V) return;
    const long long i = (long long)b * V + v;
    const long long ia = SHARED_ALBEDO ? (long long)v : i;
    shade_vertex(coef, normals[3 * i], normals[3 * i + 1], normals[3 * i + 2], albedo + 3 * ia, out + 3 * i);
}

// Grid-stride over the vertices of batch element b = blockIdx.y: grad_normals and grad_albedo per
// vertex, grad_sh (zeroed by the caller) by block reduction.
template <bool SHARED_ALBEDO>
__global__ void sh_shade_bwd(const float* __restrict__ normals, const float* __restrict__ albedo,
                             const float* __restrict__ sh, const float* __restrict__ grad_out,
                             float* __restrict__ grad_normals, float* __restrict__ grad_albedo,
                             float* __restrict__ grad_sh, int B, int V) {
    __shared__ float coef[27];
    const int b = blockIdx.y;
    load_coefficients(sh, b, coef);
    float acc[27];
#pragma unroll
    for (int j = 0; j < 27; ++j) acc[j] = 0.f;
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < V; v += gridDim.x * blockDim.x) {
        const long long i = (long long)b * V + v;
        const long long ia = SHARED_ALBEDO ? (long long)v : i;
        float gn[3];
        shade_vertex_bwd<SHARED_ALBEDO>(coef, normals[3 * i], normals[3 * i + 1], normals[3 * i + 2], albedo + 3 * ia,
                                        grad_out + 3 * i, acc, grad_albedo + 3 * ia, gn, 0);
        grad_normals[3 * i] = gn[0];
        grad_normals[3 * i + 1] = gn[1];
        grad_normals[3 * i + 2] = gn[2];
    }
    block_add_grad_sh(acc, grad_sh + b * 27);
}

// One thread per vertex v of batch element b = blockIdx.y: the unit area-weighted normal (as
// vertex_normals_fwd), then its colour; the normal never goes to memory.
template <bool SHARED_ALBEDO>
__global__ void shade_vertices_fwd(const float* __restrict__ vertices, const int* __restrict__ offsets,
                                   const int* __restrict__ corners, const float* __restrict__ albedo,
                                   const float* __restrict__ sh, float* __restrict__ out, int B, int V) {
    __shared__ float coef[27];
    const int b = blockIdx.y;
    load_coefficients(sh, b, coef);
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B || v >= V) return;
    const long long i = (long long)b * V + v;
    const long long ia = SHARED_ALBEDO ? (long long)v : i;
    float s[3];
    summed_normal(vertices + (long long)b * V * 3, offsets, corners, v, V, s);
    const float inv = inverse_length(s);
    shade_vertex(coef, s[0] * inv, s[1] * inv, s[2] * inv, albedo + 3 * ia, out + 3 * i);
}

// sh_shade_bwd at the recomputed normal, writing instead of grad_normals the gradient of the
// summed normal s, (grad_n - n (n . grad_n)) / |s|, for vertex_normals_bwd (kernels/normals.cu)
// to gather. Launch as sh_shade_bwd. accumulate != 0 adds grad_albedo to what it holds (a shared
// albedo's atomics then go into it instead of into zeros).
template <bool SHARED_ALBEDO>
__global__ void shade_vertices_bwd_sum(const float* __restrict__ vertices, const int* __restrict__ offsets,
                                       const int* __restrict__ corners, const float* __restrict__ albedo,
                                       const float* __restrict__ sh, const float* __restrict__ grad_out,
                                       float* __restrict__ grad_sum, float* __restrict__ grad_albedo,
                                       float* __restrict__ grad_sh, int B, int V, int accumulate) {
    __shared__ float coef[27];
    const int b = blockIdx.y;
    load_coefficients(sh, b, coef);
    float acc[27];
#pragma unroll
    for (int j = 0; j < 27; ++j) acc[j] = 0.f;
    const float* vb = vertices + (long long)b * V * 3;
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < V; v += gridDim.x * blockDim.x) {
        const long long i = (long long)b * V + v;
        const long long ia = SHARED_ALBEDO ? (long long)v : i;
        float s[3], gn[3];
        summed_normal(vb, offsets, corners, v, V, s);
        const float inv = inverse_length(s);
        const float nx = s[0] * inv, ny = s[1] * inv, nz = s[2] * inv;
        shade_vertex_bwd<SHARED_ALBEDO>(coef, nx, ny, nz, albedo + 3 * ia, grad_out + 3 * i, acc, grad_albedo + 3 * ia,
                                        gn, accumulate);
        const float ndotg = nx * gn[0] + ny * gn[1] + nz * gn[2];
        grad_sum[3 * i] = (gn[0] - nx * ndotg) * inv;
        grad_sum[3 * i + 1] = (gn[1] - ny * ndotg) * inv;
        grad_sum[3 * i + 2] = (gn[2] - nz * ndotg) * inv;
    }
    block_add_grad_sh(acc, grad_sh + b * 27);
}
