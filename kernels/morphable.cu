// Morphable model evaluation: out = mean + (coefficients * std) @ basis, and its backward.
//
// The basis is (K, N) float32 row-major (K components, N = 3V values), the coefficients come in two
// row-major parts (B, n_a) and (B, n_b) that together scale the K = n_a + n_b basis rows, each
// multiplied by std[k] on the fly (a geometry basis holds the shape rows, then the expression rows).
// Both kernels are small tiled GEMMs: the basis is the big operand (tens of MB) and is read from
// global memory once per call; everything else is small or written once.
//
// Templates: TY thread rows of 32 threads, RM batch rows per thread. <8, 8> serves batches above 8
// (a 64-row batch tile shares each basis tile among 8 thread rows); the forward <2, 4> (an 8-row
// batch tile, so that a batch of 1 does not compute 63 empty rows) serves batches up to 8 whose
// coefficients do not fit the gemv forward's shared memory (below); the gemv kernels take the rest.
// (A 3xTF32 tensor-core forward for large batches measured slower on an H200, 302 vs 260 us at
// batch 64, and was removed.)

constexpr int TILE_N = 128;  // forward: columns per block (32 threads x 4 adjacent columns)
constexpr int TILE_K = 16;   // forward: basis rows staged in shared memory per step
constexpr int TILE_KB = 128; // backward: basis rows (outputs) per block (32 threads x 4 rows)
constexpr int TILE_J = 32;   // backward: columns staged in shared memory per step

__device__ __forceinline__ float scaled_coefficient(const float* __restrict__ coeff_a,
                                                    const float* __restrict__ coeff_b,
                                                    const float* __restrict__ std_dev, int b, int k,
                                                    int n_a, int n_b)
{
    const float c = (k < n_a) ? coeff_a[(long long)b * n_a + k] : coeff_b[(long long)b * n_b + (k - n_a)];
    return c * std_dev[k];
}

// acc[c] += a * w[c] for the 4 columns of a thread's tile row (both tiled kernels' inner step).
__device__ __forceinline__ void fma4(float (&acc)[4], float a, float4 w)
{
    acc[0] = fmaf(a, w.x, acc[0]);
    acc[1] = fmaf(a, w.y, acc[1]);
    acc[2] = fmaf(a, w.z, acc[2]);
    acc[3] = fmaf(a, w.w, acc[3]);
}

// One thread computes an RM x 4 tile of out: batch rows b0 + ty*RM + r, columns col0 + tx*4 + c.
// A block owns TILE_N columns for every batch row: it loops over batch tiles of TY*RM rows inside,
// so a block's basis columns (K x TILE_N floats) are re-read from L2 at most, never from DRAM twice.
// Each step stages TILE_K basis rows (coalesced 128-byte row segments) and the matching scaled
// coefficients in shared memory; every basis value then feeds TY*RM multiply-adds from registers.
template <int TY, int RM>
__global__ void __launch_bounds__(32 * TY) morphable_fwd(
    const float* __restrict__ coeff_a, const float* __restrict__ coeff_b,
    const float* __restrict__ std_dev, const float* __restrict__ basis,
    const float* __restrict__ mean, float* __restrict__ out,
    int batch, int n_a, int n_b, long long n)
{
    constexpr int BM = TY * RM;
    constexpr int NT = 32 * TY;
    __shared__ __align__(16) float cs[TILE_K][BM];
    __shared__ __align__(16) float bs[TILE_K][TILE_N];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
    const long long col0 = (long long)blockIdx.x * TILE_N;
    const int n_k = n_a + n_b;

    for (int b0 = 0; b0 < batch; b0 += BM) {
        float acc[RM][4];
#pragma unroll
        for (int r = 0; r < RM; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;

        for (int k0 = 0; k0 < n_k; k0 += TILE_K) {
            for (int i = tid; i < TILE_K * BM; i += NT) {
                const int kk = i / BM, bb = i % BM, k = k0 + kk, b = b0 + bb;
                cs[kk][bb] = (k < n_k && b < batch) ? scaled_coefficient(coeff_a, coeff_b, std_dev, b, k, n_a, n_b)
                                                    : 0.0f;
            }
            for (int i = tid; i < TILE_K * TILE_N; i += NT) {
                const int kk = i / TILE_N, jj = i % TILE_N, k = k0 + kk;
                const long long j = col0 + jj;
                bs[kk][jj] = (k < n_k && j < n) ? basis[(long long)k * n + j] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < TILE_K; ++kk) {
                const float4 w = *reinterpret_cast<const float4*>(&bs[kk][tx * 4]);
#pragma unroll
                for (int r = 0; r < RM; ++r) fma4(acc[r], cs[kk][ty * RM + r], w);
            }
            __syncthreads();
        }
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            const int b = b0 + ty * RM + r;
            if (b >= batch) continue;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const long long j = col0 + tx * 4 + c;
                if (j < n) out[(long long)b * n + j] = mean[j] + acc[r][c];
            }
        }
    }
}

// Backward: grad_a[b, k] (k < n_a) and grad_b[b, k - n_a] = std[k] * sum_j grad_out[b, j] basis[k, j].
// The sum over j (N, ~10^5) is long and the output (B x K) small, so the sum is split: block
// (x, y, z) sums the columns [x*chunk, (x+1)*chunk) for basis rows y*TILE_KB.. and batch rows
// z*TY*RM.., one thread an RM x 4 tile (batch rows ty*RM + r, basis rows tx*4 + c), and adds its
// partial sums into the zero-initialised outputs with atomicAdd (so the last bits of the result
// depend on the order in which blocks finish; the CPU path is the deterministic reference).
// Each step stages TILE_J columns of grad_out and of TILE_KB basis rows in shared memory.
template <int TY, int RM>
__global__ void __launch_bounds__(32 * TY) morphable_bwd(
    const float* __restrict__ std_dev, const float* __restrict__ basis,
    const float* __restrict__ grad_out, float* __restrict__ grad_a, float* __restrict__ grad_b,
    int batch, int n_a, int n_b, long long n, int chunk)
{
    constexpr int BM = TY * RM;
    constexpr int NT = 32 * TY;
    __shared__ float gs[TILE_J][BM + 1];  // +1: the column-wise stores below hit distinct banks
    __shared__ __align__(16) float bs[TILE_J][TILE_KB + 4];  // +4 keeps rows 16-byte aligned, fewer bank conflicts
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
    const long long j_begin = (long long)blockIdx.x * chunk;
    const long long j_end = min(j_begin + chunk, n);
    const int k0 = blockIdx.y * TILE_KB;
    const int b0 = blockIdx.z * BM;
    const int n_k = n_a + n_b;

    float acc[RM][4];
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;

    for (long long j0 = j_begin; j0 < j_end; j0 += TILE_J) {
        for (int i = tid; i < TILE_J * BM; i += NT) {
            const int jj = i % TILE_J, bb = i / TILE_J, b = b0 + bb;
            const long long j = j0 + jj;
            gs[jj][bb] = (b < batch && j < j_end) ? grad_out[(long long)b * n + j] : 0.0f;
        }
        for (int i = tid; i < TILE_J * TILE_KB; i += NT) {
            const int jj = i % TILE_J, kk = i / TILE_J, k = k0 + kk;
            const long long j = j0 + jj;
            bs[jj][kk] = (k < n_k && j < j_end) ? basis[(long long)k * n + j] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int jj = 0; jj < TILE_J; ++jj) {
            const float4 w = *reinterpret_cast<const float4*>(&bs[jj][tx * 4]);
#pragma unroll
            for (int r = 0; r < RM; ++r) fma4(acc[r], gs[jj][ty * RM + r], w);
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < RM; ++r) {
        const int b = b0 + ty * RM + r;
        if (b >= batch) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int k = k0 + tx * 4 + c;
            if (k >= n_k) continue;
            const float v = acc[r][c] * std_dev[k];
            if (k < n_a) atomicAdd(&grad_a[(long long)b * n_a + k], v);
            else atomicAdd(&grad_b[(long long)b * n_b + (k - n_a)], v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small batches (B <= RM <= 8): the forward and backward are matrix-vector products that read the
// whole basis (K x N floats, ~60 MB for the default geometry) once for a few flops per value, so
// they are bound by how many basis loads are in flight, not by arithmetic. The tiled kernels above
// stage through shared memory with one load in flight per thread and a barrier per 16 rows; these
// stream the basis straight into registers, 16 independent coalesced loads per thread.
// (The basis rows are N = 3V floats long, N odd for most meshes, so rows are not 16-byte aligned
// and the loads are 4-byte ones: a warp still reads 128 contiguous bytes per instruction.)
constexpr int GEMV_COLS = 4;    // forward: columns per thread, 32 apart (lane + 32 c)
constexpr int GEMV_SLICES = 8;  // forward: warps per block, each summing its own slice of the K rows
constexpr int GEMV_UNROLL = 4;  // forward: basis rows loaded together (GEMV_UNROLL * GEMV_COLS loads in flight)

// Forward, block of GEMV_SLICES warps = 256 threads, grid ceil(N / 128): the block owns 128
// columns, warp w sums rows [w * per, (w + 1) * per) of them for every batch row, lane l the
// columns col0 + l + 32 c. The partial sums of the 8 slices are added in slice order through shared
// memory (deterministic) and warp 0 writes mean + sum. The scaled coefficients (K x RM, dynamic
// shared memory: pass n_k * RM * 4 bytes) are read as warp-wide broadcasts.
template <int RM>
__global__ void __launch_bounds__(32 * GEMV_SLICES) morphable_fwd_gemv(
    const float* __restrict__ coeff_a, const float* __restrict__ coeff_b,
    const float* __restrict__ std_dev, const float* __restrict__ basis,
    const float* __restrict__ mean, float* __restrict__ out,
    int batch, int n_a, int n_b, long long n)
{
    extern __shared__ float cs[];  // cs[k * RM + r] = coefficient (batch row r, basis row k) * std[k]
    __shared__ float red[GEMV_SLICES - 1][RM][GEMV_COLS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_k = n_a + n_b;
    for (int i = threadIdx.x; i < n_k * RM; i += blockDim.x) {
        const int k = i / RM, r = i - k * RM;
        cs[i] = (r < batch) ? scaled_coefficient(coeff_a, coeff_b, std_dev, r, k, n_a, n_b) : 0.0f;
    }
    __syncthreads();

    const long long col0 = (long long)blockIdx.x * (32 * GEMV_COLS) + lane;
    bool in[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) in[c] = col0 + 32 * c < n;
    const int per = (n_k + GEMV_SLICES - 1) / GEMV_SLICES;
    const int k_begin = min(n_k, warp * per), k_end = min(n_k, k_begin + per);

    float acc[RM][GEMV_COLS];
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) acc[r][c] = 0.0f;

    const float* row = basis + (long long)k_begin * n + col0;
    int k = k_begin;
    for (; k + GEMV_UNROLL <= k_end; k += GEMV_UNROLL) {
        float w[GEMV_UNROLL][GEMV_COLS];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int c = 0; c < GEMV_COLS; ++c) w[u][c] = in[c] ? __ldg(row + u * n + 32 * c) : 0.0f;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < RM; ++r) {
                const float a = cs[(k + u) * RM + r];
#pragma unroll
                for (int c = 0; c < GEMV_COLS; ++c) acc[r][c] = fmaf(a, w[u][c], acc[r][c]);
            }
        row += GEMV_UNROLL * n;
    }
    for (; k < k_end; ++k) {
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            const float a = cs[k * RM + r];
#pragma unroll
            for (int c = 0; c < GEMV_COLS; ++c) acc[r][c] = fmaf(a, in[c] ? __ldg(row + 32 * c) : 0.0f, acc[r][c]);
        }
        row += n;
    }

    if (warp > 0) {
#pragma unroll
        for (int r = 0; r < RM; ++r)
#pragma unroll
            for (int c = 0; c < GEMV_COLS; ++c) red[warp - 1][r][c][lane] = acc[r][c];
    }
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) {
        if (!in[c]) continue;
        const long long j = col0 + 32 * c;
        const float m = mean[j];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            if (r >= batch) continue;
            float s = acc[r][c];
            for (int w = 0; w < GEMV_SLICES - 1; ++w) s += red[w][r][c][lane];
            out[(long long)r * n + j] = m + s;
        }
    }
}

constexpr int GEMV_CHUNK = 1024;   // backward: columns per block (32 per lane)
constexpr int GEMV_ROWS = 16;      // backward: basis rows per block (2 per warp)
constexpr int GEMV_BWD_UNROLL = 8; // backward: basis loads in flight per lane

// Backward, block of 8 warps = 256 threads, grid (ceil(N / GEMV_CHUNK), ceil(K / GEMV_ROWS)):
// the block stages its GEMV_CHUNK columns of grad_out (RM rows, zero past the batch) in shared
// memory, then warp w takes the basis rows k0 + w, k0 + w + 8: lane l reads the row's columns
// j0 + l + 32 u (coalesced, GEMV_BWD_UNROLL loads in flight), multiplies by the staged gradients,
// and the warp sums its lanes with shuffles; lane 0 adds std[k] * sum into grad_a / grad_b
// (zeroed by the caller) with one atomicAdd per (batch row, basis row, block).
template <int RM>
__global__ void __launch_bounds__(256) morphable_bwd_gemv(
    const float* __restrict__ std_dev, const float* __restrict__ basis,
    const float* __restrict__ grad_out, float* __restrict__ grad_a, float* __restrict__ grad_b,
    int batch, int n_a, int n_b, long long n, int chunk)
{
    __shared__ float gs[RM][GEMV_CHUNK];
    (void)chunk;  // the chunk is GEMV_CHUNK; kept for the tiled kernel's argument order
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long j0 = (long long)blockIdx.x * GEMV_CHUNK;
    const int n_k = n_a + n_b;
    for (int i = threadIdx.x; i < RM * GEMV_CHUNK; i += blockDim.x) {
        const int r = i / GEMV_CHUNK, jj = i - r * GEMV_CHUNK;
        const long long j = j0 + jj;
        gs[r][jj] = (r < batch && j < n) ? grad_out[(long long)r * n + j] : 0.0f;
    }
    __syncthreads();
    const long long width = min((long long)GEMV_CHUNK, n - j0);
    for (int k = blockIdx.y * GEMV_ROWS + warp; k < min(n_k, (int)(blockIdx.y + 1) * GEMV_ROWS); k += 8) {
        const float* row = basis + (long long)k * n + j0;
        float acc[RM];
#pragma unroll
        for (int r = 0; r < RM; ++r) acc[r] = 0.0f;
        for (int u0 = 0; u0 < GEMV_CHUNK / 32; u0 += GEMV_BWD_UNROLL) {
            float w[GEMV_BWD_UNROLL];
#pragma unroll
            for (int u = 0; u < GEMV_BWD_UNROLL; ++u) {
                const int jj = (u0 + u) * 32 + lane;
                w[u] = jj < width ? __ldg(row + jj) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < GEMV_BWD_UNROLL; ++u) {
                const int jj = (u0 + u) * 32 + lane;
#pragma unroll
                for (int r = 0; r < RM; ++r) acc[r] = fmaf(gs[r][jj], w[u], acc[r]);
            }
        }
        const float sd = std_dev[k];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            float s = acc[r];
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
            if (lane == 0 && r < batch) {
                if (k < n_a) atomicAdd(&grad_a[(long long)r * n_a + k], s * sd);
                else atomicAdd(&grad_b[(long long)r * n_b + (k - n_a)], s * sd);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Large batches through cuBLAS (fastface/model/morphable.py, _use_cublas: in TF32 both ways, in float32
// the backward only, as GPU run 7 measured on an H200): the GEMM is cuBLAS's (fastface/_gemm.py), these
// two kernels its small operand and its epilogue.

// scaled[b, k] = coefficient (b, k) * std[k], (B, K) row-major: the GEMM's left operand. One thread an entry.
extern "C" __global__ void morphable_scale_coefficients(
    const float* __restrict__ coeff_a, const float* __restrict__ coeff_b, const float* __restrict__ std_dev,
    float* __restrict__ scaled, int batch, int n_a, int n_b)
{
    const int n_k = n_a + n_b;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)batch * n_k) return;
    const int b = (int)(i / n_k), k = (int)(i - (long long)b * n_k);
    scaled[i] = scaled_coefficient(coeff_a, coeff_b, std_dev, b, k, n_a, n_b);
}

// The backward's epilogue: full (B, K) = grad_out @ basis^T from cuBLAS; grad_a[b, k] = full[b, k] std[k]
// for k < n_a, grad_b[b, k - n_a] = full[b, k] std[k] for the rest. One thread an entry.
extern "C" __global__ void morphable_split_gradient(
    const float* __restrict__ full, const float* __restrict__ std_dev, float* __restrict__ grad_a,
    float* __restrict__ grad_b, int batch, int n_a, int n_b)
{
    const int n_k = n_a + n_b;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)batch * n_k) return;
    const int b = (int)(i / n_k), k = (int)(i - (long long)b * n_k);
    const float v = full[i] * std_dev[k];
    if (k < n_a) grad_a[(long long)b * n_a + k] = v;
    else grad_b[(long long)b * n_b + (k - n_a)] = v;
}

template __global__ void morphable_fwd<2, 4>(const float*, const float*, const float*, const float*, const float*,
                                             float*, int, int, int, long long);
template __global__ void morphable_fwd<8, 8>(const float*, const float*, const float*, const float*, const float*,
                                             float*, int, int, int, long long);
template __global__ void morphable_bwd<8, 8>(const float*, const float*, const float*, float*, float*, int, int, int,
                                             long long, int);
#define FASTFACE_GEMV(RM)                                                                                   \
    template __global__ void morphable_fwd_gemv<RM>(const float*, const float*, const float*, const float*,      \
                                                    const float*, float*, int, int, int, long long);            \
    template __global__ void morphable_bwd_gemv<RM>(const float*, const float*, const float*, float*, float*,   \
                                                    int, int, int, long long, int);
FASTFACE_GEMV(1)
FASTFACE_GEMV(2)
FASTFACE_GEMV(4)
FASTFACE_GEMV(8)
#undef FASTFACE_GEMV
