// Rasterizer kernels: rasterize_fwd (triangles -> 64-bit depth/id keys), rasterize_resolve<C>
// (keys -> tri_id, perspective-correct barycentrics, depth, and optionally interpolated
// attributes), rasterize_bwd and rasterize_interpolate_bwd<C> (barycentric gradients -> clip
// positions, optionally fused with the interpolation backward).
//
// The Numba twins live in fastface/ops/rasterize.py; the module docstring there explains the tie
// rule and why it is watertight. This file is compiled with --fmad=false: the edge functions,
// depths and barycentrics then round exactly like the Numba code (which does not contract a*b+c
// either), every expression below being written in the same order as its twin.
//
// Memory safety does not rely on the Python checks (they can be turned off): vertex and triangle
// indices are tested against V and T before any load.

#include "pixel_attributes.cuh"

#define EMPTY_KEY 0xFFFFFFFFFFFFFFFFull

struct ScreenVertex {
    float x, y, z;  // pixel coordinates (y down, centres at integers) and NDC depth
    bool valid;     // w > 0 and everything finite
};

__device__ __forceinline__ ScreenVertex screen_vertex(float4 p, float half_w, float half_h) {
    ScreenVertex s;
    float rw = 1.0f / p.w;
    s.x = (p.x * rw + 1.0f) * half_w - 0.5f;
    s.y = (1.0f - p.y * rw) * half_h - 0.5f;
    s.z = p.z * rw;
    s.valid = (p.w > 0.0f) & isfinite(s.x) & isfinite(s.y) & isfinite(s.z);  // bitwise: no branches
    return s;
}

// An edge a->b of a triangle whose area has sign o: its direction, times o, and its origin, the
// lexicographically smaller endpoint (by x, then y), from which it is evaluated:
// E(p) = dx * (py - oy) - dy * (px - ox). A triangle sharing the edge computes the direction
// b - a as a - b (exactly the negation) and uses the same origin, so its values are exactly the
// negated ones (a zero may differ in sign, which no test below sees). This is the product
// s * (canonical direction) of the earlier canonical-edge form, with the same rounded values.
struct Edge {
    float ox, oy, dx, dy;
    bool own;  // top-left rule: the oriented direction (dx, dy) has dy < 0, or dy == 0 and dx > 0
};

__device__ __forceinline__ Edge make_edge(float ax, float ay, float bx, float by) {
    Edge e;
    bool a_first = (ax < bx) | ((ax == bx) & (ay < by));
    e.ox = a_first ? ax : bx;
    e.oy = a_first ? ay : by;
    e.dx = bx - ax;
    e.dy = by - ay;
    e.own = false;
    return e;
}

__device__ __forceinline__ void orient_edge(Edge& e, float o) {
    e.dx = o * e.dx;
    e.dy = o * e.dy;
    e.own = (e.dy < 0.0f) | ((e.dy == 0.0f) & (e.dx > 0.0f));
}

__device__ __forceinline__ float edge_value(const Edge& e, float px, float py) {
    return e.dx * (py - e.oy) - e.dy * (px - e.ox);
}

// Bitwise, not short-circuit, operators: the tests then compile to predicates instead of a
// branch (and a divergence region) per edge.
__device__ __forceinline__ bool edge_inside(const Edge& e, float v) {
    return (v > 0.0f) | ((v == 0.0f) & e.own);
}

// Order-preserving unsigned key of a float (-0 folded onto +0 by adding +0).
__device__ __forceinline__ unsigned int depth_key(float z) {
    unsigned int u = __float_as_uint(z + 0.0f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_depth(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Vertex setup of one triangle from clip positions (pb: one image's positions).
struct ClipSetup {
    const float4* __restrict__ pb;
    float half_w, half_h;
    __device__ __forceinline__ void operator()(int i0, int i1, int i2, ScreenVertex& v0, ScreenVertex& v1,
                                               ScreenVertex& v2) const {
        // The three loads first, as independent statements: written inside the screen_vertex
        // calls, the compiler issued each after the previous vertex's division (whose slow path
        // is a call), serialising three memory latencies per thread.
        float4 p0 = pb[i0], p1 = pb[i1], p2 = pb[i2];
        v0 = screen_vertex(p0, half_w, half_h);
        v1 = screen_vertex(p1, half_w, half_h);
        v2 = screen_vertex(p2, half_w, half_h);
    }
};

// The fragment sink of the rasterizer: a 64-bit atomicMin into one image's key buffer (32-bit
// offsets within an image: H, W <= 16384 by check_resolution, which value checks do not switch off).
struct AtomicMinSink {
    unsigned long long* __restrict__ zb;
    int W;
    __device__ __forceinline__ void operator()(int i, int j, unsigned long long key) const {
        atomicMin(zb + (i * W + j), key);
    }
};

// The work of one triangle in one image: vertex setup (Setup), bounding box over pixel centres,
// edge tests and, per covered centre, the key (depth key << 32 | triangle id) handed to Sink (in
// the library, a 64-bit atomicMin: the min makes the result independent of thread order, nearest
// depth first, then the lower triangle id). The templates let bench/profile_rasterize.py time
// variants of the setup and the sink around this same code.
template <class Setup, class Sink>
__device__ __forceinline__ void rasterize_triangle(const Setup& setup, int i0, int i1, int i2, int t, int H, int W,
                                                   int cull, const Sink& sink) {
    ScreenVertex v0, v1, v2;
    setup(i0, i1, i2, v0, v1, v2);
    if (!(v0.valid & v1.valid & v2.valid)) return;

    // Bounding box over pixel centres, clamped in float before any conversion to int.
    float ilo = fmaxf(ceilf(fminf(fminf(v0.y, v1.y), v2.y)), 0.0f);
    float ihi = fminf(floorf(fmaxf(fmaxf(v0.y, v1.y), v2.y)), (float)(H - 1));
    float jlo = fmaxf(ceilf(fminf(fminf(v0.x, v1.x), v2.x)), 0.0f);
    float jhi = fminf(floorf(fmaxf(fmaxf(v0.x, v1.x), v2.x)), (float)(W - 1));
    if (ilo > ihi || jlo > jhi) return;

    Edge e0 = make_edge(v1.x, v1.y, v2.x, v2.y);  // edge 0: v1->v2, opposite v0
    Edge e1 = make_edge(v2.x, v2.y, v0.x, v0.y);  // edge 1: v2->v0
    Edge e2 = make_edge(v0.x, v0.y, v1.x, v1.y);  // edge 2: v0->v1
    float area = e2.dx * (v2.y - e2.oy) - e2.dy * (v2.x - e2.ox);
    if (area == 0.0f) return;
    if (cull && area > 0.0f) return;  // y-down pixel frame: counter-clockwise on screen has area < 0
    float o = area > 0.0f ? 1.0f : -1.0f;
    orient_edge(e0, o);
    orient_edge(e1, o);
    orient_edge(e2, o);

    // The box's centres in row-major order as one flat loop: a warp then runs as many iterations
    // as its largest box has centres, not (most rows) x (most columns) as nested loops would.
    // Every centre is evaluated directly (no incremental stepping), so the values do not depend
    // on the loop's shape and equal the Numba twin's nested loops.
    int i = (int)ilo, j_begin = (int)jlo, j_end = (int)jhi;
    int j = j_begin;
    int n = ((int)ihi - i + 1) * (j_end - j_begin + 1);  // <= 16384^2 < 2^31 (check_resolution)
    for (int k = 0; k < n; ++k) {
        float px = (float)j, py = (float)i;
        float w0 = edge_value(e0, px, py);
        float w1 = edge_value(e1, px, py);
        float w2 = edge_value(e2, px, py);
        if (edge_inside(e0, w0) & edge_inside(e1, w1) & edge_inside(e2, w2)) {
            float z = (w0 * v0.z + w1 * v1.z + w2 * v2.z) / (w0 + w1 + w2);
            if (z >= -1.0f && z <= 1.0f) sink(i, j, ((unsigned long long)depth_key(z) << 32) | (unsigned int)t);
        }
        bool wrap = j == j_end;
        j = wrap ? j_begin : j + 1;
        i += wrap ? 1 : 0;
    }
}

// One thread per (image, triangle), launched as a 2-D grid: x over triangles (blocks of 256),
// y over images (a strided loop past 65535 images), so no thread divides a 64-bit index.
// Triangles of face meshes cover about one pixel each, so a thread per triangle keeps every lane
// busy; consecutive threads take consecutive triangles of one image, which are neighbours in a
// mesh, so their loads and atomics land in nearby cache lines. zbuf (B, H, W) is initialised to
// all ones by the caller.
extern "C" __global__ void rasterize_fwd(const float4* __restrict__ pos, const int* __restrict__ tri, int B, int V,
                                         int T, int H, int W, int cull, unsigned long long* __restrict__ zbuf) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    float half_w = (float)W * 0.5f, half_h = (float)H * 0.5f;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        ClipSetup setup{pos + (long long)b * V, half_w, half_h};
        AtomicMinSink sink{zbuf + (long long)b * H * W, W};
        rasterize_triangle(setup, i0, i1, i2, t, H, W, cull, sink);
    }
}

// The triangle pass with the vertex setup done beforehand, once per vertex instead of once per
// triangle corner (a face mesh has about 6 corners per vertex): rasterize_setup writes scr (B, V)
// float4 = (sx, sy, zn, valid ? 1 : 0), one thread per (vertex, image) on the same 2-D grid shape
// as rasterize_fwd; rasterize_fwd_screen is rasterize_fwd reading those (the same numbers, so
// the same keys). Used when fastface.ops.rasterize._FWD_PREPASS is set: it trades three
// divisions per triangle for a write and a read of 16 bytes per vertex.
extern "C" __global__ void rasterize_setup(const float4* __restrict__ pos, int B, int V, int H, int W,
                                           float4* __restrict__ scr) {
    int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= V) return;
    float half_w = (float)W * 0.5f, half_h = (float)H * 0.5f;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long k = (long long)b * V + v;
        ScreenVertex s = screen_vertex(pos[k], half_w, half_h);
        scr[k] = make_float4(s.x, s.y, s.z, s.valid ? 1.0f : 0.0f);
    }
}

struct ScreenSetup {
    const float4* __restrict__ sb;
    __device__ __forceinline__ void operator()(int i0, int i1, int i2, ScreenVertex& v0, ScreenVertex& v1,
                                               ScreenVertex& v2) const {
        float4 a = sb[i0], c = sb[i1], d = sb[i2];
        v0.x = a.x; v0.y = a.y; v0.z = a.z; v0.valid = a.w != 0.0f;
        v1.x = c.x; v1.y = c.y; v1.z = c.z; v1.valid = c.w != 0.0f;
        v2.x = d.x; v2.y = d.y; v2.z = d.z; v2.valid = d.w != 0.0f;
    }
};

extern "C" __global__ void rasterize_fwd_screen(const float4* __restrict__ scr, const int* __restrict__ tri, int B,
                                                int V, int T, int H, int W, int cull,
                                                unsigned long long* __restrict__ zbuf) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        ScreenSetup setup{scr + (long long)b * V};
        AtomicMinSink sink{zbuf + (long long)b * H * W, W};
        rasterize_triangle(setup, i0, i1, i2, t, H, W, cull, sink);
    }
}

// Perspective-correct barycentrics of pixel NDC (X, Y): with a_k = (x_k - X w_k, y_k - Y w_k),
// the clip-space point sum b_k p_k projects onto (X, Y) exactly when sum b_k a_k = 0, solved by
// b_k proportional to c0 = a1 x a2, c1 = a2 x a0, c2 = a0 x a1 (2-D cross products).
struct PixelBary {
    float a0x, a0y, a1x, a1y, a2x, a2y, c0, c1, s;
};

__device__ __forceinline__ PixelBary pixel_bary(float4 p0, float4 p1, float4 p2, float X, float Y) {
    PixelBary r;
    r.a0x = p0.x - X * p0.w;
    r.a0y = p0.y - Y * p0.w;
    r.a1x = p1.x - X * p1.w;
    r.a1y = p1.y - Y * p1.w;
    r.a2x = p2.x - X * p2.w;
    r.a2y = p2.y - Y * p2.w;
    r.c0 = r.a1x * r.a2y - r.a1y * r.a2x;
    r.c1 = r.a2x * r.a0y - r.a2y * r.a0x;
    float c2 = r.a0x * r.a1y - r.a0y * r.a1x;
    r.s = r.c0 + r.c1 + c2;
    return r;
}

// Per-pixel kernels run on a 2-D grid: x over the H*W pixels of an image (blocks of 256, so a warp
// reads 32 consecutive pixels of one row), y over images (a strided loop past 65535 images), so no
// thread divides a 64-bit index. PIXEL_LOOP opens that loop and names p (flat pixel index), b, i, j.
#define PIXEL_LOOP                                                 \
    int q = blockIdx.x * blockDim.x + threadIdx.x;                 \
    int hw = H * W;                                                \
    if (q >= hw) return;                                           \
    int i = q / W;                                                 \
    int j = q - i * W;                                             \
    for (int b = blockIdx.y; b < B; b += gridDim.y)

// The resolve of one pixel: unpack the winning triangle, recompute its perspective-correct
// barycentrics from the clip positions, decode the depth from the key, and (C != 0) interpolate
// the attributes in the same pass, which saves a launch and a round trip of tri_id and bary
// through memory. C > 0: that many channels, known at compile time; C == -1: n_ch channels;
// C == 0: no attributes (attr and out are not touched).
// zbuf and bary share their memory: the caller clears the bary output as the key buffer (8 bytes a
// pixel either way), so a call allocates nothing beyond its outputs. Each thread reads its own
// pixel's key before it writes that pixel's barycentrics, and no other thread touches either, so
// neither pointer is __restrict__.
template <int C>
__device__ __forceinline__ void resolve_pixel(const float4* __restrict__ pos, const int* __restrict__ tri,
                                              const unsigned long long* zbuf, int V, int T, int H,
                                              int W, const float* __restrict__ attr, int nc, int attr_batched,
                                              int* __restrict__ tri_id, float2* bary,
                                              float* __restrict__ depth, float* __restrict__ out, int b, int i,
                                              int j, long long p) {
    unsigned long long key = zbuf[p];
    unsigned int t = (unsigned int)(key & 0xFFFFFFFFull);
    int i0, i1, i2;
    if (key == EMPTY_KEY || !triangle_corners(tri, t, T, V, i0, i1, i2)) {
        tri_id[p] = -1;
        bary[p] = make_float2(0.0f, 0.0f);
        depth[p] = __int_as_float(0x7F800000);  // +inf
        if (C != 0) {
            for (int c = 0; c < nc; ++c) out[p * nc + c] = 0.0f;
        }
        return;
    }
    // Every load that depends only on the triangle is issued here, before the divisions (whose
    // slow path is a call the compiler does not move loads across): written at their first use,
    // the attribute loads waited for the position loads, one more memory latency per pixel.
    const float4* pb = pos + (long long)b * V;
    float4 q0 = pb[i0], q1 = pb[i1], q2 = pb[i2];
    const float* ab = attr + (attr_batched ? (long long)b * V * nc : 0LL);
    const float* a0 = ab + (long long)i0 * nc;
    const float* a1 = ab + (long long)i1 * nc;
    const float* a2 = ab + (long long)i2 * nc;
    constexpr int CR = C > 0 ? C : 1;  // registers for C > 0 channels known at compile time
    float r0[CR], r1[CR], r2[CR];
    if (C > 0) {
#pragma unroll
        for (int c = 0; c < CR; ++c) {
            r0[c] = a0[c];
            r1[c] = a1[c];
            r2[c] = a2[c];
        }
    }
    float X = (float)(2 * j + 1 - W) / (float)W;
    float Y = (float)(H - 2 * i - 1) / (float)H;
    PixelBary r = pixel_bary(q0, q1, q2, X, Y);
    float u = r.s != 0.0f ? r.c0 / r.s : 0.0f;
    float v = r.s != 0.0f ? r.c1 / r.s : 0.0f;
    tri_id[p] = (int)t;
    bary[p] = make_float2(u, v);
    depth[p] = key_depth((unsigned int)(key >> 32));
    float w2 = (1.0f - u) - v;
    if (C > 0) {
#pragma unroll
        for (int c = 0; c < CR; ++c) out[p * nc + c] = (u * r0[c] + v * r1[c]) + w2 * r2[c];
    } else if (C != 0) {
        for (int c = 0; c < nc; ++c) out[p * nc + c] = (u * a0[c] + v * a1[c]) + w2 * a2[c];
    }
}

// One thread per pixel (see PIXEL_LOOP for the launch shape): keys -> Raster arrays (+ attributes).
template <int C>
__global__ void rasterize_resolve(const float4* __restrict__ pos, const int* __restrict__ tri,
                                  const unsigned long long* zbuf, int B, int V, int T, int H, int W,
                                  const float* __restrict__ attr, int n_ch, int attr_batched,
                                  int* __restrict__ tri_id, float2* bary, float* __restrict__ depth,
                                  float* __restrict__ out) {
    int nc = channels<C>(n_ch);
    PIXEL_LOOP {
        resolve_pixel<C>(pos, tri, zbuf, V, T, H, W, attr, nc, attr_batched, tri_id, bary, depth, out, b, i, j,
                         (long long)b * hw + q);
    }
}

// Adds (gx, gy, 0, gw) to a vertex's float4 gradient (the zero changes no bit of z's slot).
__device__ __forceinline__ void add_pos_grad(float4* g, float gx, float gy, float gw) {
    atomic_add4(g, make_float4(gx, gy, 0.0f, gw));
}

// Chain rule from (gu, gv) on the barycentrics of one pixel to its triangle's clip positions.
__device__ __forceinline__ void bary_grad_to_pos(const PixelBary& r, float gu, float gv, float X, float Y,
                                                 float4* gp0, float4* gp1, float4* gp2) {
    // b_k = c_k / s: dL/dc_k = (g_k - G) / s with G = gu u + gv v and g_2 = 0.
    float G = (gu * r.c0 + gv * r.c1) / r.s;
    float d0 = (gu - G) / r.s;
    float d1 = (gv - G) / r.s;
    float d2 = -G / r.s;
    // c0 = a1 x a2, c1 = a2 x a0, c2 = a0 x a1  ->  gradients of the a_k.
    float g0x = d2 * r.a1y - d1 * r.a2y;
    float g0y = d1 * r.a2x - d2 * r.a1x;
    float g1x = d0 * r.a2y - d2 * r.a0y;
    float g1y = d2 * r.a0x - d0 * r.a2x;
    float g2x = d1 * r.a0y - d0 * r.a1y;
    float g2y = d0 * r.a1x - d1 * r.a0x;
    // a_k = (x_k - X w_k, y_k - Y w_k); z does not enter the barycentrics.
    add_pos_grad(gp0, g0x, g0y, -(X * g0x + Y * g0y));
    add_pos_grad(gp1, g1x, g1y, -(X * g1x + Y * g1y));
    add_pos_grad(gp2, g2x, g2y, -(X * g2x + Y * g2y));
}

// The backward of one pixel's barycentrics: recompute (c0, c1, s) from the clip positions and
// scatter d(u, v)/d(x, y, w) times grad_bary into grad_pos.
__device__ __forceinline__ void bary_bwd_pixel(const float4* __restrict__ pos, const int* __restrict__ tri,
                                               const int* __restrict__ tri_id, const float2* __restrict__ grad_bary,
                                               int V, int T, int H, int W, float4* __restrict__ grad_pos, int b,
                                               int i, int j, long long p) {
    int t = tri_id[p];
    if (t < 0 || t >= T) return;
    float2 g = grad_bary[p];
    if (g.x == 0.0f && g.y == 0.0f) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    float X = (float)(2 * j + 1 - W) / (float)W;
    float Y = (float)(H - 2 * i - 1) / (float)H;
    const float4* pb = pos + (long long)b * V;
    PixelBary r = pixel_bary(pb[i0], pb[i1], pb[i2], X, Y);
    if (r.s == 0.0f) return;
    float4* gb = grad_pos + (long long)b * V;
    bary_grad_to_pos(r, g.x, g.y, X, Y, gb + i0, gb + i1, gb + i2);
}

// One thread per pixel (see PIXEL_LOOP): grad_bary -> grad_pos (a cupy.zeros buffer), with
// atomics since neighbouring pixels share vertices. Empty pixels and zero gradients cost none.
extern "C" __global__ void rasterize_bwd(const float4* __restrict__ pos, const int* __restrict__ tri,
                                         const int* __restrict__ tri_id, const float2* __restrict__ grad_bary,
                                         int B, int V, int T, int H, int W, float4* __restrict__ grad_pos) {
    PIXEL_LOOP {
        bary_bwd_pixel(pos, tri, tri_id, grad_bary, V, T, H, W, grad_pos, b, i, j, (long long)b * hw + q);
    }
}

// Attribute gradients of C = 3 or 4 channels accumulate in a (..., V, 4) float4 buffer, with one
// vector atomic per vertex instead of C scalar ones (the caller drops the 4th column when C = 3);
// C = 2 uses float2 atomics on the (..., V, 2) output itself; other counts, scalar atomics.
template <int C>
__device__ __forceinline__ constexpr bool attr_grad_float4() {
    return C == 3 || C == 4;
}

// The fused backward of one pixel of rasterize_resolve<C>: form grad_bary from grad_out and the
// attributes in registers (never storing it), scatter u, v, 1-u-v times grad_out into grad_attr,
// then the barycentric gradient into grad_pos.
template <int C>
__device__ __forceinline__ void interp_bwd_pixel(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                 const float* __restrict__ attr, const int* __restrict__ tri_id,
                                                 const float* __restrict__ grad_out, int V, int T, int H, int W,
                                                 int nc, int attr_batched, float4* __restrict__ grad_pos,
                                                 float* __restrict__ grad_attr, int b, int i, int j, long long p) {
    int i0, i1, i2;
    if (!triangle_corners(tri, tri_id[p], T, V, i0, i1, i2)) return;
    // The loads that depend only on the pixel and the triangle, written before the divisions (see
    // resolve_pixel). Unlike there, ptxas (CUDA 13.0) still schedules the attribute and grad_out
    // loads after the barycentrics' arithmetic, which waits for the positions.
    long long vbase = attr_batched ? (long long)b * V : 0LL;
    const float* a0 = attr + (vbase + i0) * nc;
    const float* a1 = attr + (vbase + i1) * nc;
    const float* a2 = attr + (vbase + i2) * nc;
    const float* go = grad_out + p * nc;
    constexpr bool VEC = attr_grad_float4<C>() || C == 2;
    float g[4] = {0.0f, 0.0f, 0.0f, 0.0f}, r0[4], r1[4], r2[4];
    if (VEC) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
            g[c] = go[c];
            r0[c] = a0[c];
            r1[c] = a1[c];
            r2[c] = a2[c];
        }
    }
    const float4* pb = pos + (long long)b * V;
    float4 q0 = pb[i0], q1 = pb[i1], q2 = pb[i2];
    float X = (float)(2 * j + 1 - W) / (float)W;
    float Y = (float)(H - 2 * i - 1) / (float)H;
    PixelBary r = pixel_bary(q0, q1, q2, X, Y);
    if (r.s == 0.0f) return;
    float u = r.c0 / r.s;
    float v = r.c1 / r.s;
    float w2 = (1.0f - u) - v;
    float gu = 0.0f, gv = 0.0f;
    if (VEC) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
            gu += g[c] * (r0[c] - r2[c]);
            gv += g[c] * (r1[c] - r2[c]);
        }
        scatter_weighted_vector<attr_grad_float4<C>() ? 4 : 2>(grad_attr, vbase, i0, i1, i2, g, u, v, w2);
    } else {
        interpolate_grads_scalar(a0, a1, a2, go, grad_attr, vbase, i0, i1, i2, nc, u, v, w2, gu, gv);
    }
    if (gu == 0.0f && gv == 0.0f) return;
    float4* gb = grad_pos + (long long)b * V;
    bary_grad_to_pos(r, gu, gv, X, Y, gb + i0, gb + i1, gb + i2);
}

// One thread per pixel (see PIXEL_LOOP): the backward of rasterize_resolve<C> (C != 0) to positions
// and attributes, both by atomics into cupy.zeros buffers (grad_attr: (..., V, 4) when C is 3 or
// 4, see attr_grad_float4). Saves a launch and a write and read of grad_bary against
// interpolate_bwd + rasterize_bwd.
template <int C>
__global__ void rasterize_interpolate_bwd(const float4* __restrict__ pos, const int* __restrict__ tri,
                                          const float* __restrict__ attr, const int* __restrict__ tri_id,
                                          const float* __restrict__ grad_out, int B, int V, int T, int H, int W,
                                          int n_ch, int attr_batched, float4* __restrict__ grad_pos,
                                          float* __restrict__ grad_attr) {
    int nc = channels<C>(n_ch);
    PIXEL_LOOP {
        interp_bwd_pixel<C>(pos, tri, attr, tri_id, grad_out, V, T, H, W, nc, attr_batched, grad_pos, grad_attr, b, i,
                            j, (long long)b * hw + q);
    }
}

// One thread per row of a (n, 4) float4 buffer: copies its first 3 floats to a (n, 3) array (the
// attribute gradient of 3 channels, accumulated with float4 atomics).
extern "C" __global__ void float4_to_float3(const float4* __restrict__ src, int n, float* __restrict__ dst) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    float4 a = src[k];
    dst[3LL * k] = a.x;
    dst[3LL * k + 1] = a.y;
    dst[3LL * k + 2] = a.z;
}
