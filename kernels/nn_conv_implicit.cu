// Implicit-GEMM convolution of fastface.nn for the float16 mode, kept in a file of its own. The
// same convolution (with the same prologue) as im2col_fwd followed by a GEMM in
// fastface/nn/conv.py; it has no Numba twin: on the CPU the gather + BLAS GEMM is the algorithm.
//
// Tensor cores through inline PTX (mma.sync.m16n8k16 and ldmatrix), not the WMMA C++ API: the
// CUDA headers that CuPy's NVRTC sees (the pip wheels') lack crt/mma.h, so <mma.h> cannot be
// included there. Inline PTX needs no header at all. The register layouts below follow the PTX
// ISA ("Matrix Fragments for mma.m16n8k16 with floating point type", and ldmatrix); a numpy
// emulation of this kernel, lane by lane (tests/nn/test_implicit_gemm_emulation.py), checks
// every index against a plain matrix product on the CPU.
#include <cuda_fp16.h>

#define CI_BM 128
#define CI_BN 64
#define CI_BK 32
#define CI_LDA (CI_BK + 8)   // 80-byte rows: the 8 row addresses of an ldmatrix hit 8 distinct bank quads
#define CI_LDB (CI_BN + 8)   // 144-byte rows: likewise
#define CI_LDC (CI_BN + 4)

struct alignas(16) Half8 {
    __half v[8];
};

__device__ __forceinline__ unsigned smem_address(const void* p)
{
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, and register j of
// lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of matrix j (the lower column in the low
// half).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// The same with each matrix transposed: register j of lane l receives rows 2(l%4) and 2(l%4)+1,
// column l/4, of matrix j as stored.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// d = a (16x16, row) b (16x8, col) + d, float16 operands, float32 accumulators.
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Implicit-GEMM convolution, float16 in and out, float32 accumulation on tensor cores:
// z (M, N) = im2col(relu?(x + in_bias)) @ w without ever writing cols. One block of 256 threads
// (8 warps) computes a 128 x 64 tile of z (128 output pixels x 64 output channels); warp w a
// 32 x 32 sub-tile at rows 32 (w % 4), columns 32 (w / 4), as 2 x 4 mma.m16n8k16 tiles. The K
// loop walks the taps (kh, kw) and, within a tap, chunks of 32 input channels: for a fixed tap
// the 32 channels of one output pixel are 64 contiguous bytes of NHWC input, so every A-tile row
// is 4 aligned 16-byte loads (the prologue's bias and ReLU applied on the way), with zeros for
// padding and for rows past M. The next chunk is loaded into registers while the tensor cores
// work on the current one (two shared-memory buffers, one __syncthreads per step). Needs
// C % 32 == 0 and N % 8 == 0 (the host checks); the epilogue stages the float accumulators
// through shared memory and stores float16 with 16-byte stores.
extern "C" __global__ void __launch_bounds__(256)
conv_implicit_fwd(const __half* __restrict__ x, const float* __restrict__ in_bias, int in_relu,
                  const __half* __restrict__ w, int B, int H, int W, int C, int KH, int KW,
                  int stride, int pad, int Ho, int Wo, int N, __half* __restrict__ z)
{
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

    const int warp = tid >> 5, lane = tid & 31;
    const int wm = (warp & 3) * 32, wn = (warp >> 2) * 32;
    // ldmatrix row addresses: lane l points at row (l % 8) of matrix l / 8. For A (row-major
    // M x K in smem) the four matrices are the 16 x 16 tile's quadrants (rows 0-7 | 8-15) x
    // (cols 0-7 | 8-15), matrix j = rows 8 (j % 2), cols 8 (j / 2): registers a0..a3 of the
    // mma fragment. For B (row-major K x N in smem, transposed by ldmatrix) matrix j is k rows
    // 8 (j % 2), n columns 8 (j / 2) of a 16 x 16 tile: registers (b0, b1) of the n-tiles 0 and 1.
    const int ld_r = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int ld_c = (lane >> 4) * 8;

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    load(0);
    store(0);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        if (step + 1 < steps) load(step + 1);
#pragma unroll
        for (int kk = 0; kk < CI_BK; kk += 16) {
            unsigned fa[2][4], fb[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i)
                ldmatrix_x4(fa[i], smem_address(&As[buf][wm + i * 16 + ld_r][kk + ld_c]));
#pragma unroll
            for (int p = 0; p < 2; ++p)
                ldmatrix_x4_trans(fb[p], smem_address(&Bs[buf][kk + ld_r][wn + p * 16 + ld_c]));
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    mma_16816(acc[i][j], fa[i], fb[j >> 1][(j & 1) * 2], fb[j >> 1][(j & 1) * 2 + 1]);
        }
        if (step + 1 < steps) store(buf ^ 1);
        __syncthreads();
    }

    // Epilogue: the A/B buffers are dead (the loop ended on a __syncthreads), reuse them for C.
    // Accumulator element e of lane l sits at row l/4 + 8 (e / 2), column 2 (l % 4) + e % 2.
    const int g = lane >> 2, tg = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                Cs[wm + i * 16 + g + (e >> 1) * 8][wn + j * 8 + tg * 2 + (e & 1)] = acc[i][j][e];
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
