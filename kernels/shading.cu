// Spherical-harmonics vertex shading (DESIGN.md's SH layout); the Numba twins are in
// fastface/ops/shading.py (same names, same argument order, plus B and V here).
//
// Layout: normals, colours and gradients (B, V, 3) float32; albedo (B, V, 3), or (V, 3) shared by
// the batch when SHARED_ALBEDO; sh and grad_sh (B, 9, 3). All C-contiguous.
// E_c = sum_k K_k sh[k, c] P_k(n), with P_k the bare basis polynomials (1, y, z, x, xy, yz,
// 3z^2 - 1, xz, x^2 - y^2) and K_k = A_l(k) c_k.
//
// Launch shape (both kernels): grid (blocks over V, B), blocks of 256 threads (at least 27, and a
// multiple of 32). A block serves one batch element, so its 27 lighting coefficients K_k sh[k, c]
// are loaded once into shared memory and read by every thread as a broadcast.

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

// One thread per vertex v of batch element b = blockIdx.y; writes albedo_c * E_c.
template <bool SHARED_ALBEDO>
__global__ void sh_shade_fwd(const float* __restrict__ normals, const float* __restrict__ albedo,
                             const float* __restrict__ sh, float* __restrict__ out, int B, int V) {
    __shared__ float coef[27];
    const int b = blockIdx.y;
    if (threadIdx.x < 27) coef[threadIdx.x] = sh[b * 27 + threadIdx.x] * kBandFactor[threadIdx.x / 3];
    __syncthreads();
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B || v >= V) return;
    const long long i = (long long)b * V + v;
    const long long ia = SHARED_ALBEDO ? (long long)v : i;
    float p[9];
    sh_basis(normals[3 * i], normals[3 * i + 1], normals[3 * i + 2], p);
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        float e = 0.f;
#pragma unroll
        for (int k = 0; k < 9; ++k) e += coef[3 * k + c] * p[k];
        out[3 * i + c] = albedo[3 * ia + c] * e;
    }
}

// Each thread handles vertices v = blockIdx.x * blockDim.x + threadIdx.x + j * gridDim.x * blockDim.x
// of batch element b = blockIdx.y (a grid-stride loop, so reads stay coalesced). It writes
// grad_normals and grad_albedo (atomicAdd over the batch when the albedo is shared) and keeps its
// 27 grad_sh sums in registers; the block then reduces them (warp shuffles, then shared memory)
// and adds them to grad_sh (zeroed by the caller) with one atomicAdd per coefficient. The host
// sizes the grid so each thread sees about 8 vertices: fewer blocks, fewer reductions.
template <bool SHARED_ALBEDO>
__global__ void sh_shade_bwd(const float* __restrict__ normals, const float* __restrict__ albedo,
                             const float* __restrict__ sh, const float* __restrict__ grad_out,
                             float* __restrict__ grad_normals, float* __restrict__ grad_albedo,
                             float* __restrict__ grad_sh, int B, int V) {
    __shared__ float coef[27];
    __shared__ float warp_sums[32][27];
    const int b = blockIdx.y;
    if (threadIdx.x < 27) coef[threadIdx.x] = sh[b * 27 + threadIdx.x] * kBandFactor[threadIdx.x / 3];
    __syncthreads();
    float acc[27];
#pragma unroll
    for (int j = 0; j < 27; ++j) acc[j] = 0.f;
    if (b < B) {
        for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < V; v += gridDim.x * blockDim.x) {
            const long long i = (long long)b * V + v;
            const long long ia = SHARED_ALBEDO ? (long long)v : i;
            const float x = normals[3 * i], y = normals[3 * i + 1], z = normals[3 * i + 2];
            float p[9], w[9];
            sh_basis(x, y, z, p);
#pragma unroll
            for (int k = 0; k < 9; ++k) w[k] = 0.f;
#pragma unroll
            for (int c = 0; c < 3; ++c) {
                const float g = grad_out[3 * i + c];
                const float ga = g * albedo[3 * ia + c];
                float e = 0.f;
#pragma unroll
                for (int k = 0; k < 9; ++k) {
                    e += coef[3 * k + c] * p[k];
                    w[k] += ga * coef[3 * k + c];
                    acc[3 * k + c] += ga * p[k];
                }
                if (SHARED_ALBEDO) {
                    atomicAdd(grad_albedo + 3 * ia + c, g * e);
                } else {
                    grad_albedo[3 * ia + c] = g * e;
                }
            }
            grad_normals[3 * i] = w[3] + w[4] * y + w[7] * z + 2.f * w[8] * x;
            grad_normals[3 * i + 1] = w[1] + w[4] * x + w[5] * z - 2.f * w[8] * y;
            grad_normals[3 * i + 2] = w[2] + w[5] * y + 6.f * w[6] * z + w[7] * x;
        }
    }
    // Block reduction of the 27 sums: within each warp by shuffles, then across warps.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < 27; ++j) {
        float s = acc[j];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
        if (lane == 0) warp_sums[warp][j] = s;
    }
    __syncthreads();
    if (threadIdx.x < 27 && b < B) {
        const int n_warps = (blockDim.x + 31) >> 5;
        float s = 0.f;
        for (int w = 0; w < n_warps; ++w) s += warp_sums[w][threadIdx.x];
        atomicAdd(grad_sh + b * 27 + threadIdx.x, s * kBandFactor[threadIdx.x / 3]);
    }
}
