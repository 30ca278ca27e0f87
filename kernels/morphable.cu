// Morphable model evaluation: out = mean + (coefficients * std) @ basis, and its backward.
//
// The basis is (K, N) float32 row-major (K components, N = 3V values), the coefficients come in two
// row-major parts (B, n_a) and (B, n_b) that together scale the K = n_a + n_b basis rows, each
// multiplied by std[k] on the fly (a geometry basis holds the shape rows, then the expression rows).
// Both kernels are small tiled GEMMs: the basis is the big operand (tens of MB) and is read from
// global memory once per call; everything else is small or written once.
//
// Templates: TY thread rows of 32 threads, RM batch rows per thread. <8, 8> serves batches above 8
// (a 64-row batch tile shares each basis tile among 8 thread rows); <2, 4> serves batches up to 8
// (an 8-row batch tile, so that a batch of 1 does not compute 63 empty rows).

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
                for (int r = 0; r < RM; ++r) {
                    const float a = cs[kk][ty * RM + r];
                    acc[r][0] = fmaf(a, w.x, acc[r][0]);
                    acc[r][1] = fmaf(a, w.y, acc[r][1]);
                    acc[r][2] = fmaf(a, w.z, acc[r][2]);
                    acc[r][3] = fmaf(a, w.w, acc[r][3]);
                }
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
            for (int r = 0; r < RM; ++r) {
                const float g = gs[jj][ty * RM + r];
                acc[r][0] = fmaf(g, w.x, acc[r][0]);
                acc[r][1] = fmaf(g, w.y, acc[r][1]);
                acc[r][2] = fmaf(g, w.z, acc[r][2]);
                acc[r][3] = fmaf(g, w.w, acc[r][3]);
            }
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

template __global__ void morphable_fwd<2, 4>(const float*, const float*, const float*, const float*, const float*,
                                             float*, int, int, int, long long);
template __global__ void morphable_fwd<8, 8>(const float*, const float*, const float*, const float*, const float*,
                                             float*, int, int, int, long long);
template __global__ void morphable_bwd<2, 4>(const float*, const float*, const float*, float*, float*, int, int, int,
                                             long long, int);
template __global__ void morphable_bwd<8, 8>(const float*, const float*, const float*, float*, float*, int, int, int,
                                             long long, int);
