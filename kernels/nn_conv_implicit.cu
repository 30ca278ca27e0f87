// Implicit-GEMM convolution of fastface.nn for the float16 mode, kept in a file of its own so that
// the im2col kernels of nn_conv.cu never depend on the WMMA headers compiling. The same
// convolution (with the same prologue) as im2col_fwd followed by a GEMM in fastface/nn/conv.py;
// it has no Numba twin: on the CPU the gather + BLAS GEMM is the algorithm.
#include <cuda_fp16.h>

// Implicit-GEMM convolution, float16 in and out, float32 accumulation on tensor cores (WMMA):
// z (M, N) = im2col(relu?(x + in_bias)) @ w without ever writing cols. One block of 256 threads
// (8 warps) computes a 128 x 64 tile of z (128 output pixels x 64 output channels); each warp a
// 32 x 32 sub-tile as 2 x 2 WMMA 16x16x16 fragments. The K loop walks the taps (kh, kw) and,
// within a tap, chunks of 32 input channels: for a fixed tap the 32 channels of one output
// pixel are 64 contiguous bytes of NHWC input, so every A-tile row is 4 aligned 16-byte loads
// (the prologue's bias and ReLU applied on the way), with zeros for padding and for rows past M.
// The next chunk is loaded into registers while the tensor cores work on the current one
// (two shared-memory buffers, one __syncthreads per step). Needs C % 32 == 0 and N % 8 == 0
// (the host checks); the epilogue stages the float accumulators through shared memory and
// stores float16 with 16-byte stores.
#include <mma.h>

#define CI_BM 128
#define CI_BN 64
#define CI_BK 32
#define CI_LDA (CI_BK + 8)
#define CI_LDB (CI_BN + 8)
#define CI_LDC (CI_BN + 4)

struct alignas(16) Half8 {
    __half v[8];
};

extern "C" __global__ void __launch_bounds__(256)
conv_implicit_fwd(const __half* __restrict__ x, const float* __restrict__ in_bias, int in_relu,
                  const __half* __restrict__ w, int B, int H, int W, int C, int KH, int KW,
                  int stride, int pad, int Ho, int Wo, int N, __half* __restrict__ z)
{
    using namespace nvcuda;
    constexpr int A_BYTES = 2 * CI_BM * CI_LDA * 2;
    constexpr int B_BYTES = 2 * CI_BK * CI_LDB * 2;
    constexpr int C_BYTES = CI_BM * CI_LDC * 4;
    constexpr int SMEM = (A_BYTES + B_BYTES) > C_BYTES ? (A_BYTES + B_BYTES) : C_BYTES;
    __shared__ __align__(128) unsigned char smem[SMEM];
    __half (*As)[CI_BM][CI_LDA] = reinterpret_cast<__half (*)[CI_BM][CI_LDA]>(smem);
    __half (*Bs)[CI_BK][CI_LDB] = reinterpret_cast<__half (*)[CI_BK][CI_LDB]>(smem + A_BYTES);
    float (*Cs)[CI_LDC] = reinterpret_cast<float (*)[CI_LDC]>(smem);

    const int tid = threadIdx.x;
    const int M = B * Ho * Wo;
    const int m0 = blockIdx.x * CI_BM;
    const int n0 = blockIdx.y * CI_BN;

    // The two A-tile rows this thread loads (rows tid/4 and tid/4 + 64, 8 channels at seg*8).
    const int a_seg = tid & 3;
    int a_b[2], a_ih[2], a_iw[2];
    bool a_ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int m = m0 + (tid >> 2) + i * 64;
        a_ok[i] = m < M;
        const int mm = a_ok[i] ? m : 0;
        const int ow = mm % Wo, t = mm / Wo;
        a_b[i] = t / Ho;
        a_ih[i] = (t % Ho) * stride - pad;
        a_iw[i] = ow * stride - pad;
    }
    // The B-tile row and 8 columns this thread loads.
    const int b_row = tid >> 3, b_col = (tid & 7) * 8;
    const bool b_ok = n0 + b_col < N;

    const int chunks = C / CI_BK;
    const int steps = KH * KW * chunks;
    Half8 ra[2], rb;

    auto load = [&](int step) {
        const int tap = step / chunks;
        const int c0 = (step - tap * chunks) * CI_BK;
        const int kh = tap / KW, kw = tap - (tap / KW) * KW;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int ih = a_ih[i] + kh, iw = a_iw[i] + kw;
            const int c = c0 + a_seg * 8;
            if (a_ok[i] && ih >= 0 && ih < H && iw >= 0 && iw < W) {
                Half8 v = *reinterpret_cast<const Half8*>(x + ((long long)(a_b[i] * H + ih) * W + iw) * C + c);
                if (in_bias != nullptr || in_relu) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        float f = __half2float(v.v[j]) + (in_bias != nullptr ? in_bias[c + j] : 0.0f);
                        if (in_relu) f = fmaxf(f, 0.0f);
                        v.v[j] = __float2half_rn(f);
                    }
                }
                ra[i] = v;
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) ra[i].v[j] = __float2half_rn(0.0f);
            }
        }
        const long long k = (long long)tap * C + c0 + b_row;
        if (b_ok) {
            rb = *reinterpret_cast<const Half8*>(w + k * N + n0 + b_col);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) rb.v[j] = __float2half_rn(0.0f);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            *reinterpret_cast<Half8*>(&As[buf][(tid >> 2) + i * 64][a_seg * 8]) = ra[i];
        *reinterpret_cast<Half8*>(&Bs[buf][b_row][b_col]) = rb;
    };

    const int warp = tid >> 5;
    const int wm = (warp & 3) * 32, wn = (warp >> 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    load(0);
    store(0);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        if (step + 1 < steps) load(step + 1);
#pragma unroll
        for (int kk = 0; kk < CI_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[buf][wm + i * 16][kk], CI_LDA);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[buf][kk][wn + j * 16], CI_LDB);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (step + 1 < steps) store(buf ^ 1);
        __syncthreads();
    }

    // Epilogue: the A/B buffers are dead (the loop ended on a __syncthreads), reuse them for C.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&Cs[wm + i * 16][wn + j * 16], acc[i][j], CI_LDC, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int v = tid + i * 256;
        const int r = v >> 3, col = (v & 7) * 8;
        const int m = m0 + r;
        if (m < M && n0 + col < N) {
            Half8 o;
#pragma unroll
            for (int j = 0; j < 8; ++j) o.v[j] = __float2half_rn(Cs[r][col + j]);
            *reinterpret_cast<Half8*>(z + (long long)m * N + n0 + col) = o;
        }
    }
}
