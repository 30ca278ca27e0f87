// Per-vertex camera ops: rigid transform, OpenGL perspective projection, pixel projection, and
// their backwards. The Numba twins are in fastface/ops/camera.py (same names, same argument order,
// plus B and V here). Points and gradients are (B, V, 3) float32, C-contiguous; rotation (B, 3, 3),
// translation (B, 3), focal (B,) in pixels. Camera space is OpenGL's: visible points have z < 0.
//
// The elementwise kernels run one thread per (batch, vertex), flat index b * V + v, so that
// consecutive threads touch consecutive vertices (coalesced); they are memory-bound.

// One thread per vertex v of batch element b = blockIdx.y (grid (blocks over V, B)), so the
// block's 12 pose numbers come from one batch element. points is (V, 3) when SHARED_POINTS.
template <bool SHARED_POINTS>
__global__ void rigid_transform_fwd(const float* __restrict__ points, const float* __restrict__ rotation,
                                    const float* __restrict__ translation, float* __restrict__ out, int B, int V) {
    const int b = blockIdx.y;
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B || v >= V) return;
    const long long i = (long long)b * V + v;
    const long long ip = SHARED_POINTS ? (long long)v : i;
    const float x = points[3 * ip], y = points[3 * ip + 1], z = points[3 * ip + 2];
    const float* r = rotation + 9 * b;
    const float* t = translation + 3 * b;
#pragma unroll
    for (int row = 0; row < 3; ++row) out[3 * i + row] = r[3 * row] * x + r[3 * row + 1] * y + r[3 * row + 2] * z + t[row];
}

// grad_points = R^T g per vertex (atomicAdd over the batch when SHARED_POINTS, into zeros);
// grad_rotation[r][j] = sum_v g_r p_j and grad_translation[r] = sum_v g_r are reductions over V:
// each thread sums its vertices (a grid-stride loop over v for batch element b = blockIdx.y, about
// 8 vertices per thread so fewer blocks reduce), the block reduces the 12 sums (warp shuffles,
// then shared memory) and adds them with one atomicAdd each into the zeroed outputs.
template <bool SHARED_POINTS>
__global__ void rigid_transform_bwd(const float* __restrict__ points, const float* __restrict__ rotation,
                                    const float* __restrict__ translation, const float* __restrict__ grad_out,
                                    float* __restrict__ grad_points, float* __restrict__ grad_rotation,
                                    float* __restrict__ grad_translation, int B, int V) {
    __shared__ float warp_sums[32][12];
    const int b = blockIdx.y;
    float acc[12];
#pragma unroll
    for (int j = 0; j < 12; ++j) acc[j] = 0.f;
    if (b < B) {
        const float* r = rotation + 9 * b;
        for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < V; v += gridDim.x * blockDim.x) {
            const long long i = (long long)b * V + v;
            const long long ip = SHARED_POINTS ? (long long)v : i;
            const float g[3] = {grad_out[3 * i], grad_out[3 * i + 1], grad_out[3 * i + 2]};
            const float p[3] = {points[3 * ip], points[3 * ip + 1], points[3 * ip + 2]};
#pragma unroll
            for (int j = 0; j < 3; ++j) {
                const float gp = r[j] * g[0] + r[3 + j] * g[1] + r[6 + j] * g[2];
                if (SHARED_POINTS) {
                    atomicAdd(grad_points + 3 * ip + j, gp);
                } else {
                    grad_points[3 * ip + j] = gp;
                }
            }
#pragma unroll
            for (int row = 0; row < 3; ++row) {
#pragma unroll
                for (int j = 0; j < 3; ++j) acc[3 * row + j] += g[row] * p[j];
                acc[9 + row] += g[row];
            }
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < 12; ++j) {
        float s = acc[j];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
        if (lane == 0) warp_sums[warp][j] = s;
    }
    __syncthreads();
    if (threadIdx.x < 12 && b < B) {
        const int n_warps = (blockDim.x + 31) >> 5;
        float s = 0.f;
        for (int w = 0; w < n_warps; ++w) s += warp_sums[w][threadIdx.x];
        if (threadIdx.x < 9) {
            atomicAdd(grad_rotation + 9 * b + threadIdx.x, s);
        } else {
            atomicAdd(grad_translation + 3 * b + (threadIdx.x - 9), s);
        }
    }
}

// One thread per (batch, vertex): clip = ((2f/W) x, (2f/H) y, za z + zb, -z), out is (B, V, 4).
extern "C" __global__ void perspective_projection_fwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                      float* __restrict__ out, int B, int V, int height, int width,
                                                      float near, float far) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const float f = focal[i / V];
    const float za = (far + near) / (near - far), zb = 2.f * far * near / (near - far);
    const float z = points[3 * i + 2];
    out[4 * i] = (2.f * f / width) * points[3 * i];
    out[4 * i + 1] = (2.f * f / height) * points[3 * i + 1];
    out[4 * i + 2] = za * z + zb;
    out[4 * i + 3] = -z;
}

// One thread per (batch, vertex): the transpose of the (linear) forward.
extern "C" __global__ void perspective_projection_bwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                      const float* __restrict__ grad_out, float* __restrict__ grad_points,
                                                      int B, int V, int height, int width, float near, float far) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    (void)points;
    const float f = focal[i / V];
    const float za = (far + near) / (near - far);
    grad_points[3 * i] = (2.f * f / width) * grad_out[4 * i];
    grad_points[3 * i + 1] = (2.f * f / height) * grad_out[4 * i + 1];
    grad_points[3 * i + 2] = za * grad_out[4 * i + 2] - grad_out[4 * i + 3];
}

// One thread per (batch, vertex): x_pix = f x / -z + W/2 - 0.5, y_pix = -f y / -z + H/2 - 0.5;
// out is (B, V, 2).
extern "C" __global__ void project_to_pixels_fwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                 float* __restrict__ out, int B, int V, int height, int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const float s = focal[i / V] / -points[3 * i + 2];
    out[2 * i] = s * points[3 * i] + 0.5f * width - 0.5f;
    out[2 * i + 1] = -s * points[3 * i + 1] + 0.5f * height - 0.5f;
}

// One thread per (batch, vertex). With s = f / -z: d x_pix = s dx + s x / -z dz and
// d y_pix = -s dy - s y / -z dz.
extern "C" __global__ void project_to_pixels_bwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                 const float* __restrict__ grad_out, float* __restrict__ grad_points,
                                                 int B, int V, int height, int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    (void)height;
    (void)width;
    const float inv_w = 1.f / -points[3 * i + 2];
    const float s = focal[i / V] * inv_w;
    const float gx = grad_out[2 * i], gy = grad_out[2 * i + 1];
    grad_points[3 * i] = s * gx;
    grad_points[3 * i + 1] = -s * gy;
    grad_points[3 * i + 2] = s * inv_w * (points[3 * i] * gx - points[3 * i + 1] * gy);
}
