// Camera ops: Euler rotation, rigid transform, OpenGL perspective projection, pixel projection, and
// their backwards. The Numba twins are in fastface/ops/camera.py (same names, same argument order,
// plus the sizes B and V here). Points and gradients are (B, V, 3) float32, C-contiguous; angles (B, 3),
// rotation (B, 3, 3), translation (B, 3). Camera space is OpenGL's: visible points have z < 0.
//
// Focal length: the projections take `focal` (B,) in pixels, or a null pointer and `focal_scalar`
// for one focal shared by the batch (the Numba twins get an empty array there), so that the common
// scalar call allocates and fills no (B,) array. The host passes the null pointer as
// fastface._backend.NULL_POINTER (an 8-byte zero; not None, which CuPy does not pass as null).
//
// The elementwise kernels run one thread per (batch, vertex), flat index b * V + v, so that
// consecutive threads touch consecutive vertices (coalesced); they are memory-bound.

// R = Rz(roll) Ry(yaw) Rx(pitch) written out (docs/conventions.md), row-major into r[9].
__device__ __forceinline__ void euler_matrix(float cp, float sp, float cy, float sy, float cr, float sr,
                                             float r[9]) {
    r[0] = cr * cy;
    r[1] = cr * sy * sp - sr * cp;
    r[2] = cr * sy * cp + sr * sp;
    r[3] = sr * cy;
    r[4] = sr * sy * sp + cr * cp;
    r[5] = sr * sy * cp - cr * sp;
    r[6] = -sy;
    r[7] = cy * sp;
    r[8] = cy * cp;
}

// The cosines and sines of one batch element's (pitch, yaw, roll).
struct EulerSinCos {
    float cp, sp, cy, sy, cr, sr;
};

__device__ __forceinline__ EulerSinCos euler_sincos(const float* __restrict__ angles) {
    EulerSinCos e;
    sincosf(angles[0], &e.sp, &e.cp);
    sincosf(angles[1], &e.sy, &e.cy);
    sincosf(angles[2], &e.sr, &e.cr);
    return e;
}

// One thread per batch element: angles (B, 3) = (pitch, yaw, roll) -> rotation (B, 3, 3). B is a few
// images, so the whole op is one small launch instead of a chain of tiny array operations.
extern "C" __global__ void euler_rotation_fwd(const float* __restrict__ angles, float* __restrict__ rotation, int B) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const EulerSinCos e = euler_sincos(angles + 3 * b);
    euler_matrix(e.cp, e.sp, e.cy, e.sy, e.cr, e.sr, rotation + 9 * b);
}

// One thread per batch element: grad_angles (B, 3) = <grad_out, dR/d angle> with grad_out (B, 3, 3).
// The derivatives follow from R's structure: d/dpitch turns R's columns (1, 2) into (2, -1) (Rx is
// the right factor), d/droll turns its rows (0, 1) into (-1, 0) (Rz is the left factor), and d/dyaw
// is Rz dRy Rx, whose rows are cr u, sr u and w with u = (-sy, cy sp, cy cp), w = (-cy, -sy sp, -sy cp).
extern "C" __global__ void euler_rotation_bwd(const float* __restrict__ angles, const float* __restrict__ grad_out,
                                              float* __restrict__ grad_angles, int B) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const EulerSinCos e = euler_sincos(angles + 3 * b);
    const float cp = e.cp, sp = e.sp, cy = e.cy, sy = e.sy, cr = e.cr, sr = e.sr;
    float r[9];
    euler_matrix(cp, sp, cy, sy, cr, sr, r);
    const float* g = grad_out + 9 * b;
    const float u[3] = {-sy, cy * sp, cy * cp}, w[3] = {-cy, -sy * sp, -sy * cp};
    float pitch = 0.f, yaw = 0.f, roll = 0.f;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
        pitch += g[3 * k + 1] * r[3 * k + 2] - g[3 * k + 2] * r[3 * k + 1];
        yaw += (cr * g[k] + sr * g[3 + k]) * u[k] + g[6 + k] * w[k];
        roll += g[3 + k] * r[k] - g[k] * r[3 + k];
    }
    grad_angles[3 * b] = pitch;
    grad_angles[3 * b + 1] = yaw;
    grad_angles[3 * b + 2] = roll;
}

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

// grad_points = R^T g per vertex (atomicAdd over the batch when SHARED_POINTS, into zeros); with
// accumulate != 0 it is added to what grad_points holds (atomics into it, not into zeros, when shared);
// grad_rotation[r][j] = sum_v g_r p_j and grad_translation[r] = sum_v g_r are reductions over V:
// each thread sums its vertices (a grid-stride loop over v for batch element b = blockIdx.y, about
// 8 vertices per thread so fewer blocks reduce), the block reduces the 12 sums (warp shuffles,
// then shared memory) and adds them with one atomicAdd each into the zeroed outputs.
template <bool SHARED_POINTS>
__global__ void rigid_transform_bwd(const float* __restrict__ points, const float* __restrict__ rotation,
                                    const float* __restrict__ translation, const float* __restrict__ grad_out,
                                    float* __restrict__ grad_points, float* __restrict__ grad_rotation,
                                    float* __restrict__ grad_translation, int B, int V, int accumulate) {
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
                } else if (accumulate) {
                    grad_points[3 * ip + j] += gp;
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

// Batch element b's focal length: focal[b], or focal_scalar when focal is null (see the top).
__device__ __forceinline__ float focal_of(const float* __restrict__ focal, float focal_scalar, long long b) {
    return focal != nullptr ? focal[b] : focal_scalar;
}

// One thread per (batch, vertex): clip = ((2f/W) x, (2f/H) y, za z + zb, -z), out is (B, V, 4).
extern "C" __global__ void perspective_projection_fwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                      float focal_scalar, float* __restrict__ out, int B, int V,
                                                      int height, int width, float near, float far) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const float f = focal_of(focal, focal_scalar, i / V);
    const float za = (far + near) / (near - far), zb = 2.f * far * near / (near - far);
    const float z = points[3 * i + 2];
    out[4 * i] = (2.f * f / width) * points[3 * i];
    out[4 * i + 1] = (2.f * f / height) * points[3 * i + 1];
    out[4 * i + 2] = za * z + zb;
    out[4 * i + 3] = -z;
}

// One thread per (batch, vertex): the transpose of the (linear) forward. accumulate != 0 adds the gradient
// to what grad_points holds (the render chain's backward adds it to the shading's, saving a pass).
extern "C" __global__ void perspective_projection_bwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                      float focal_scalar, const float* __restrict__ grad_out,
                                                      float* __restrict__ grad_points, int B, int V, int height,
                                                      int width, float near, float far, int accumulate) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    (void)points;
    const float f = focal_of(focal, focal_scalar, i / V);
    const float za = (far + near) / (near - far);
    const float gx = (2.f * f / width) * grad_out[4 * i];
    const float gy = (2.f * f / height) * grad_out[4 * i + 1];
    const float gz = za * grad_out[4 * i + 2] - grad_out[4 * i + 3];
    if (accumulate) {
        grad_points[3 * i] += gx;
        grad_points[3 * i + 1] += gy;
        grad_points[3 * i + 2] += gz;
    } else {
        grad_points[3 * i] = gx;
        grad_points[3 * i + 1] = gy;
        grad_points[3 * i + 2] = gz;
    }
}

// One thread per (batch, vertex): x_pix = f x / -z + W/2 - 0.5, y_pix = -f y / -z + H/2 - 0.5;
// out is (B, V, 2).
extern "C" __global__ void project_to_pixels_fwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                 float focal_scalar, float* __restrict__ out, int B, int V, int height,
                                                 int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const float s = focal_of(focal, focal_scalar, i / V) / -points[3 * i + 2];
    out[2 * i] = s * points[3 * i] + 0.5f * width - 0.5f;
    out[2 * i + 1] = -s * points[3 * i + 1] + 0.5f * height - 0.5f;
}

// One thread per (batch, vertex). With s = f / -z: d x_pix = s dx + s x / -z dz and
// d y_pix = -s dy - s y / -z dz.
extern "C" __global__ void project_to_pixels_bwd(const float* __restrict__ points, const float* __restrict__ focal,
                                                 float focal_scalar, const float* __restrict__ grad_out,
                                                 float* __restrict__ grad_points, int B, int V, int height, int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    (void)height;
    (void)width;
    const float inv_w = 1.f / -points[3 * i + 2];
    const float s = focal_of(focal, focal_scalar, i / V) * inv_w;
    const float gx = grad_out[2 * i], gy = grad_out[2 * i + 1];
    grad_points[3 * i] = s * gx;
    grad_points[3 * i + 1] = -s * gy;
    grad_points[3 * i + 2] = s * inv_w * (points[3 * i] * gx - points[3 * i + 1] * gy);
}
