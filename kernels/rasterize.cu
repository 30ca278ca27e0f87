// Rasterizer kernels: rasterize_fwd (triangles -> 64-bit depth/id keys), rasterize_resolve<C>
// (keys -> tri_id, perspective-correct barycentrics, depth, and optionally interpolated
// attributes), rasterize_bwd and rasterize_interpolate_bwd<C> (barycentric gradients -> clip
// positions, optionally fused with the interpolation backward).
//
// The Numba twins live in fastface/ops/rasterize.py; the module docstring there explains the
// fixed-point coverage (exact integer edge functions on a 1/256-pixel grid, in int or long long),
// the tie rule and why it is watertight, the guard-band clipper and the float64 barycentrics. This
// file is compiled with --fmad=false: depths, cut points and barycentrics then round exactly like
// the Numba code (which does not contract a*b+c either), every expression below being written in
// the same order as its twin.
//
// Memory safety does not rely on the Python checks (they can be turned off): vertex and triangle
// indices are tested against V and T before any load.

#include "pixel_attributes.cuh"

#define EMPTY_KEY 0xFFFFFFFFFFFFFFFFull

// Fixed point (fastface.ops.rasterize: SUBPIXEL_BITS, GUARD_BAND): screen positions snap to 1/256
// pixel, and the fast path takes only vertices inside the guard band (GUARD_BAND pixels beyond each
// side of the screen), so a snapped coordinate stays below 2^23, a difference below 2^24 and an edge
// value below 2^50: exact as long long (32 x 32 -> 64-bit products, one instruction each), and as int
// for triangles whose vertices lie within EXTENT_32 of each other (scan_box).
#define SUBPIXEL_BITS 8
#define SUBPIXEL_SCALE 256
#define GUARD_BAND 8192

struct ScreenVertex {
    float x, y, z;  // pixel coordinates (y down, centres at integers) and NDC depth
    bool valid;     // w > 0 and x, y, z, w finite: the triangle is drawn (clipped when not fast)
    bool fast;      // inside the guard band with a finite setup: X, Y hold its snapped position
    int X, Y;       // fixed-point position, 1/256 pixel
};

// Signed distance, scaled by W or H, of a clip point to guard-band plane k (x <= gx w, -x <= gx w,
// y <= gy w, -y <= gy w, gx = (W + 2 GUARD_BAND) / W): >= 0 is inside. Without a division, so that
// for float32 inputs every product is exact in double and the test of a vertex is exact.
__device__ __forceinline__ double plane_distance(int k, int H, int W, double x, double y, double w) {
    if (k == 0) return (double)(W + 2 * GUARD_BAND) * w - (double)W * x;
    if (k == 1) return (double)(W + 2 * GUARD_BAND) * w + (double)W * x;
    if (k == 2) return (double)(H + 2 * GUARD_BAND) * w - (double)H * y;
    return (double)(H + 2 * GUARD_BAND) * w + (double)H * y;
}

// Out of line: it runs only for vertices near or beyond the band, and inlined, its double arithmetic
// took registers from the triangle pass's hot loop.
__device__ __noinline__ bool inside_band(float4 p, int H, int W) {
    double x = (double)p.x, y = (double)p.y, w = (double)p.w;
    return (plane_distance(0, H, W, x, y, w) >= 0.0) & (plane_distance(1, H, W, x, y, w) >= 0.0) &
           (plane_distance(2, H, W, x, y, w) >= 0.0) & (plane_distance(3, H, W, x, y, w) >= 0.0);
}

// Round half to even of s * 256 (exact: a power of two), as an int.
__device__ __forceinline__ int snap(float s) { return (int)rintf(s * (float)SUBPIXEL_SCALE); }

__device__ __forceinline__ ScreenVertex screen_vertex(float4 p, float half_w, float half_h) {
    ScreenVertex s;
    float rw = 1.0f / p.w;
    s.x = (p.x * rw + 1.0f) * half_w - 0.5f;
    s.y = (1.0f - p.y * rw) * half_h - 0.5f;
    s.z = p.z * rw;
    int W = (int)(2.0f * half_w), H = (int)(2.0f * half_h);  // half_w, half_h are exactly W / 2, H / 2
    // Fast: inside the guard band (the signs of the four plane distances, exact in double) with a
    // finite setup. A float test with a margin of 64 pixels, which implies it (and that x, y, z, w are
    // finite), settles nearly every vertex without double arithmetic.
    s.valid = (p.w > 0.0f) & isfinite(p.x) & isfinite(p.y) & isfinite(p.z) & isfinite(p.w);
    float inf = __int_as_float(0x7F800000);
    s.fast = (p.w > 0.0f) & (p.w < inf) & (fabsf(s.x - half_w) < (float)(W / 2 + GUARD_BAND - 64)) &
             (fabsf(s.y - half_h) < (float)(H / 2 + GUARD_BAND - 64)) & (fabsf(s.z) < inf);
    if (!s.fast && s.valid) {
        s.fast = isfinite(s.x) & isfinite(s.y) & isfinite(s.z) && inside_band(p, H, W);
    }
    s.X = s.fast ? snap(s.x) : 0;
    s.Y = s.fast ? snap(s.y) : 0;
    return s;
}

// An edge a->b of a triangle, oriented by the sign o of its area so that the interior is where all
// three values are positive: E(p) = dx (p.y - a.y) - dy (p.x - a.x), exact in integers (so a
// triangle sharing the edge gets exactly the negated values, and at a shared vertex both incident
// edges give exactly 0).
struct Edge {
    int ax, ay, dx, dy;
    // The least value that takes a centre: 0 on an edge that owns its centres (top-left rule: the
    // oriented direction (dx, dy) has dy < 0, or dy == 0 and dx > 0), else 1. Values are integers,
    // so E >= thr is E > 0 or (E == 0 and the edge owns): one comparison per edge and centre.
    int thr;
};

__device__ __forceinline__ Edge make_edge(const ScreenVertex& a, const ScreenVertex& b, int o) {
    Edge e;
    e.ax = a.X;
    e.ay = a.Y;
    e.dx = o * (b.X - a.X);
    e.dy = o * (b.Y - a.Y);
    e.thr = ((e.dy < 0) | ((e.dy == 0) & (e.dx > 0))) ? 0 : 1;
    return e;
}

__device__ __forceinline__ long long edge_value(const Edge& e, int px, int py) {
    return (long long)e.dx * (py - e.ay) - (long long)e.dy * (px - e.ax);
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

// Vertices within this many 1/256 pixels of each other (on both axes) have their edge values
// evaluated in int (rasterize_fixed).
#define EXTENT_32 (1 << 14)

// The centres [ilo, ihi] x [jlo, jhi] of one triangle's box, its edge values in Int (int or long
// long: exact either way, see rasterize_fixed) stepped from the first centre: E(p + 1 column) =
// E(p) - dy * 256, E(p + 1 row) = E(p) + dx * 256; integers step exactly, so every centre gets the
// value that evaluating E there gives (the Numba twin, _raster_fixed, steps the same integers held
// in float64). The centres in row-major order as one flat loop: a warp then runs as many iterations
// as its largest box has centres, not (most rows) x (most columns) as nested loops would.
template <class Int, class Sink>
__device__ __forceinline__ void scan_box(const Edge& e0, const Edge& e1, const Edge& e2, float z0, float z1,
                                         float z2, int t, int ilo, int ihi, int jlo, int jhi, const Sink& sink) {
    int px = jlo << SUBPIXEL_BITS, py = ilo << SUBPIXEL_BITS;
    Int r0 = (Int)edge_value(e0, px, py), r1 = (Int)edge_value(e1, px, py), r2 = (Int)edge_value(e2, px, py);
    Int sx0 = (Int)e0.dy * SUBPIXEL_SCALE, sx1 = (Int)e1.dy * SUBPIXEL_SCALE, sx2 = (Int)e2.dy * SUBPIXEL_SCALE;
    Int sy0 = (Int)e0.dx * SUBPIXEL_SCALE, sy1 = (Int)e1.dx * SUBPIXEL_SCALE, sy2 = (Int)e2.dx * SUBPIXEL_SCALE;
    Int w0 = r0, w1 = r1, w2 = r2;  // r_k: the values at the first centre of the current row
    int i = ilo, j = jlo;
    int n = (ihi - ilo + 1) * (jhi - jlo + 1);  // <= 16384^2 < 2^31 (check_resolution)
    for (int k = 0; k < n; ++k) {
        // Bitwise, not short-circuit, operators: the tests then compile to predicates instead of a
        // branch (and a divergence region) per edge.
        if ((w0 >= e0.thr) & (w1 >= e1.thr) & (w2 >= e2.thr)) {
            float f0 = (float)w0, f1 = (float)w1, f2 = (float)w2;
            float z = (f0 * z0 + f1 * z1 + f2 * z2) / (f0 + f1 + f2);
            if (z >= -1.0f && z <= 1.0f) sink(i, j, ((unsigned long long)depth_key(z) << 32) | (unsigned int)t);
        }
        bool wrap = j == jhi;
        r0 = wrap ? r0 + sy0 : r0;
        r1 = wrap ? r1 + sy1 : r1;
        r2 = wrap ? r2 + sy2 : r2;
        w0 = wrap ? r0 : w0 - sx0;
        w1 = wrap ? r1 : w1 - sx1;
        w2 = wrap ? r2 : w2 - sx2;
        j = wrap ? jlo : j + 1;
        i += wrap ? 1 : 0;
    }
}

// Step 2 of one triangle whose corners have fixed-point positions: coverage exact in integers, and
// the depth of the key interpolated there from the exact edge values, as GPUs do (the depth test
// sees the snapped triangle; the resolve recomputes the depth it outputs from the clip positions).
// Keys (depth key << 32 | triangle id) of the covered centres go to Sink. The Numba twin is
// _raster_fixed (the same integers, carried exactly in float64).
template <class Sink>
__device__ __forceinline__ void rasterize_fixed(const ScreenVertex& v0, const ScreenVertex& v1,
                                                const ScreenVertex& v2, int t, int H, int W, int cull,
                                                const Sink& sink) {
    // Bounding box over pixel centres (centre (i, j) at (j, i) * 256): ceil and floor divisions by
    // 256 as arithmetic shifts. First, before any other work: many triangles of a fine mesh hold none.
    int ilo = max(-((-min(min(v0.Y, v1.Y), v2.Y)) >> SUBPIXEL_BITS), 0);
    int ihi = min(max(max(v0.Y, v1.Y), v2.Y) >> SUBPIXEL_BITS, H - 1);
    int jlo = max(-((-min(min(v0.X, v1.X), v2.X)) >> SUBPIXEL_BITS), 0);
    int jhi = min(max(max(v0.X, v1.X), v2.X) >> SUBPIXEL_BITS, W - 1);
    if (ilo > ihi || jlo > jhi) return;
    long long area = (long long)(v1.X - v0.X) * (v2.Y - v0.Y) - (long long)(v1.Y - v0.Y) * (v2.X - v0.X);
    if (area == 0) return;
    if (cull && area > 0) return;  // y-down pixel frame: counter-clockwise on screen has area < 0
    int o = area > 0 ? 1 : -1;
    Edge e0 = make_edge(v1, v2, o);  // edge 0: v1->v2, opposite v0
    Edge e1 = make_edge(v2, v0, o);  // edge 1: v2->v0
    Edge e2 = make_edge(v0, v1, o);  // edge 2: v0->v1

    // Edge values in 32 bits where they fit: with every vertex within EXTENT_32 of the others (a box
    // of 64 pixels, which holds nearly every triangle of a face mesh), |dx|, |dy| and the offset of
    // any centre of the box (or one row or column past it, where the stepping ends) from a vertex stay
    // below 2^14 + 2^8, so |E| < 2^30: int arithmetic, 32-bit adds instead of 64-bit multiplies and
    // an int -> float conversion instead of a 64-bit one. The same integers either way.
    int ext = max(max(max(v0.X, v1.X), v2.X) - min(min(v0.X, v1.X), v2.X),
                  max(max(v0.Y, v1.Y), v2.Y) - min(min(v0.Y, v1.Y), v2.Y));
    if (ext < EXTENT_32) {
        scan_box<int>(e0, e1, e2, v0.z, v1.z, v2.z, t, ilo, ihi, jlo, jhi, sink);
    } else {
        scan_box<long long>(e0, e1, e2, v0.z, v1.z, v2.z, t, ilo, ihi, jlo, jhi, sink);
    }
}

// A corner of the clipper's polygon: a homogeneous 2-D point (x, y, w), the triangle corner it is
// (0..2, or -1 for a cut point) and the line of the edge that leaves it (0..2: the triangle's edge
// k, from corner k+1 to k+2; 3..6: a band plane).
struct ClipPoint {
    double x, y, w;
    int corner, edge;
};

struct Line {
    double a, b, c;
};

// The 3-D cross product: the line through two homogeneous 2-D points, or the point on two lines.
__device__ __forceinline__ Line cross3(double ax, double ay, double aw, double bx, double by, double bw) {
    return Line{ay * bw - aw * by, aw * bx - ax * bw, ax * by - ay * bx};
}

// Band plane k as a line (a, b, c): plane_distance is a x + b y + c w.
__device__ __forceinline__ Line plane_line(int k, int H, int W) {
    if (k == 0) return Line{-(double)W, 0.0, (double)(W + 2 * GUARD_BAND)};
    if (k == 1) return Line{(double)W, 0.0, (double)(W + 2 * GUARD_BAND)};
    if (k == 2) return Line{0.0, -(double)H, (double)(H + 2 * GUARD_BAND)};
    return Line{0.0, (double)H, (double)(H + 2 * GUARD_BAND)};
}

// z as a finite float (an infinite depth would make 0 * inf); NaN goes beyond the far plane.
__device__ __forceinline__ float finite_depth(double z) {
    if (!(z == z)) return 2.0f;
    return (float)fmin(fmax(z, -3.4028234663852886e38), 3.4028234663852886e38);
}

// Step 2 of a triangle with a corner off the fast path (rare: kept out of line so that its registers
// and local arrays do not weigh on the fast path). The Numba twin, _raster_clipped, explains the
// algorithm: Sutherland-Hodgman against the four band planes in double homogeneous 2-D coordinates,
// every cut point the cross product of a triangle edge's line and a plane (accurate whatever the
// size of the coordinates, and the same for both triangles of a shared edge), then the fan of the
// clipped polygon on the fixed-point grid.
// Every argument is a value (the sink too): a pointer or reference to the caller's vertices or sink
// would make the caller keep them in local memory, storing them on the hot path of every triangle.
template <class Sink>
__device__ __noinline__ void rasterize_clipped(const float4* __restrict__ pb, int i0, int i1, int i2, int t, int H,
                                               int W, int cull, Sink sink) {
    float4 p[3] = {pb[i0], pb[i1], pb[i2]};
    Line lines[7];
    ClipPoint poly[2][8];
    for (int k = 0; k < 3; ++k) {
        const float4& a = p[(k + 1) % 3];
        const float4& b = p[(k + 2) % 3];
        lines[k] = cross3((double)a.x, (double)a.y, (double)a.w, (double)b.x, (double)b.y, (double)b.w);
        poly[0][k] = ClipPoint{(double)p[k].x, (double)p[k].y, (double)p[k].w, k, (k + 2) % 3};
    }
    for (int k = 0; k < 4; ++k) lines[3 + k] = plane_line(k, H, W);
    int n = 3, src = 0;
    for (int plane = 0; plane < 4; ++plane) {
        int dst = 1 - src, m = 0;
        for (int k = 0; k < n; ++k) {
            int q = k + 1 < n ? k + 1 : 0;
            const ClipPoint& P = poly[src][k];
            const ClipPoint& Q = poly[src][q];
            double dp = plane_distance(plane, H, W, P.x, P.y, P.w);
            double dq = plane_distance(plane, H, W, Q.x, Q.y, Q.w);
            if (dp >= 0.0) poly[dst][m++] = P;
            if ((dp >= 0.0) != (dq >= 0.0)) {
                const Line& L = lines[P.edge];
                const Line& M = lines[3 + plane];
                Line r = cross3(L.a, L.b, L.c, M.a, M.b, M.c);
                if (r.c < 0.0) r = Line{-r.a, -r.b, -r.c};
                // Leaving the half-plane the polygon follows the plane, entering it the edge; a point
                // at infinity (parallel by rounding) is left out.
                if (r.c > 0.0) poly[dst][m++] = ClipPoint{r.a, r.b, r.c, -1, dp >= 0.0 ? 3 + plane : P.edge};
            }
        }
        n = m;
        src = dst;
        if (n < 3) return;
    }
    ScreenVertex sv[8];
    for (int k = 0; k < n; ++k) {
        const ClipPoint& P = poly[src][k];
        if (P.corner >= 0) {
            // A corner keeps its fast-path snapped position (the setup's numbers: rasterize_setup stores
            // screen_vertex's, from which the fast path snaps again), so that edges it shares with
            // unclipped triangles stay the same integers.
            ScreenVertex c = screen_vertex(p[P.corner], (float)W * 0.5f, (float)H * 0.5f);
            if (c.fast) {
                sv[k] = c;
                continue;
            }
        }
        double sx = (P.x / P.w + 1.0) * ((double)W * 0.5) - 0.5;
        double sy = (1.0 - P.y / P.w) * ((double)H * 0.5) - 0.5;
        double z;
        if (P.corner >= 0) {
            z = (double)p[P.corner].z / (double)p[P.corner].w;
        } else {
            double c0 = (lines[0].a * P.x + lines[0].b * P.y) + lines[0].c * P.w;
            double c1 = (lines[1].a * P.x + lines[1].b * P.y) + lines[1].c * P.w;
            double c2 = (lines[2].a * P.x + lines[2].b * P.y) + lines[2].c * P.w;
            double num = (c0 * (double)p[0].z + c1 * (double)p[1].z) + c2 * (double)p[2].z;
            double den = (c0 * (double)p[0].w + c1 * (double)p[1].w) + c2 * (double)p[2].w;
            z = num / den;
        }
        sv[k].X = (int)rint(sx * (double)SUBPIXEL_SCALE);
        sv[k].Y = (int)rint(sy * (double)SUBPIXEL_SCALE);
        sv[k].x = 0.0f;  // unused past the setup
        sv[k].y = 0.0f;
        sv[k].z = finite_depth(z);
        sv[k].valid = true;
        sv[k].fast = true;
    }
    for (int k = 1; k + 1 < n; ++k) rasterize_fixed(sv[0], sv[k], sv[k + 1], t, H, W, cull, sink);
}

// The work of one triangle in one image: vertex setup (Setup), then step 2 on the fast path or
// through the clipper. The templates let bench/profile_rasterize.py time variants of the setup and
// the sink (in the library, a 64-bit atomicMin: the min makes the result independent of thread
// order, nearest depth first, then the lower triangle id) around this same code. Setup has a
// member pb, the image's clip positions, which the clipper reads.
template <class Setup, class Sink>
__device__ __forceinline__ void rasterize_triangle(const Setup& setup, int i0, int i1, int i2, int t, int H, int W,
                                                   int cull, const Sink& sink) {
    ScreenVertex v[3];
    setup(i0, i1, i2, v[0], v[1], v[2]);
    if (!(v[0].valid & v[1].valid & v[2].valid)) return;
    if (v[0].fast & v[1].fast & v[2].fast) {
        rasterize_fixed(v[0], v[1], v[2], t, H, W, cull, sink);
    } else {
        rasterize_clipped(setup.pb, i0, i1, i2, t, H, W, cull, sink);
    }
}

// One thread per (image, triangle), launched as a 2-D grid: x over triangles (blocks of 256),
// y over images (a strided loop past 65535 images), so no thread divides a 64-bit index.
// Triangles of face meshes cover about one pixel each, so a thread per triangle keeps every lane
// busy; consecutive threads take consecutive triangles of one image, which are neighbours in a
// mesh, so their loads and atomics land in nearby cache lines. zbuf (B, H, W) is initialised to
// all ones by the caller.
// __launch_bounds__(512, 2): at most 64 registers a thread. The out-of-line clipper and band test
// count in the kernel's register allocation (100 registers without the bound, where the hot path
// needs 58 and run 3's kernel had 51, allocated as 56); the bound makes the cold code spill instead,
// keeping 8 blocks of 128 threads per SM (run 3: 9). Blocks of up to 512 threads stay launchable.
// The body of the triangle pass under a vertex setup from clip positions (Setup: ClipSetup in the
// library; bench/rasterize_variants.cu times others around the same code).
template <class Setup>
__device__ __forceinline__ void triangle_pass(const float4* __restrict__ pos, const int* __restrict__ tri, int B,
                                              int V, int T, int H, int W, int cull,
                                              unsigned long long* __restrict__ zbuf) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    float half_w = (float)W * 0.5f, half_h = (float)H * 0.5f;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        Setup setup{pos + (long long)b * V, half_w, half_h};
        AtomicMinSink sink{zbuf + (long long)b * H * W, W};
        rasterize_triangle(setup, i0, i1, i2, t, H, W, cull, sink);
    }
}

extern "C" __global__ void __launch_bounds__(512, 2) rasterize_fwd(const float4* __restrict__ pos,
                                                                   const int* __restrict__ tri, int B, int V, int T,
                                                                   int H, int W, int cull,
                                                                   unsigned long long* __restrict__ zbuf) {
    triangle_pass<ClipSetup>(pos, tri, B, V, T, H, W, cull, zbuf);
}

// The triangle pass with the vertex setup done beforehand, once per vertex instead of once per
// triangle corner (a face mesh has about 6 corners per vertex): rasterize_setup writes scr (B, V)
// float4 = (sx, sy, zn, class) with class 0 (dropped), 1 (fast) or 2 (valid, to be clipped), one
// thread per (vertex, image) on the same 2-D grid shape as rasterize_fwd; rasterize_fwd_screen is
// rasterize_fwd reading those (the same numbers, so the same keys; the snapped position is a
// function of sx, sy), and the clip positions pos for the clipper. Used when
// fastface.ops.rasterize._FWD_PREPASS is set: it trades three divisions per triangle for a write
// and a read of 16 bytes per vertex.
extern "C" __global__ void rasterize_setup(const float4* __restrict__ pos, int B, int V, int H, int W,
                                           float4* __restrict__ scr) {
    int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= V) return;
    float half_w = (float)W * 0.5f, half_h = (float)H * 0.5f;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long k = (long long)b * V + v;
        ScreenVertex s = screen_vertex(pos[k], half_w, half_h);
        scr[k] = make_float4(s.x, s.y, s.z, s.fast ? 1.0f : s.valid ? 2.0f : 0.0f);
    }
}

__device__ __forceinline__ ScreenVertex unpack_screen_vertex(float4 a) {
    ScreenVertex s;
    s.x = a.x;
    s.y = a.y;
    s.z = a.z;
    s.valid = a.w != 0.0f;
    s.fast = a.w == 1.0f;
    s.X = s.fast ? snap(a.x) : 0;
    s.Y = s.fast ? snap(a.y) : 0;
    return s;
}

struct ScreenSetup {
    const float4* __restrict__ sb;
    const float4* __restrict__ pb;  // clip positions, for the clipper
    __device__ __forceinline__ void operator()(int i0, int i1, int i2, ScreenVertex& v0, ScreenVertex& v1,
                                               ScreenVertex& v2) const {
        float4 a = sb[i0], c = sb[i1], d = sb[i2];
        v0 = unpack_screen_vertex(a);
        v1 = unpack_screen_vertex(c);
        v2 = unpack_screen_vertex(d);
    }
};

extern "C" __global__ void __launch_bounds__(512, 2) rasterize_fwd_screen(const float4* __restrict__ scr,
                                                                          const int* __restrict__ tri, int B, int V,
                                                                          int T, int H, int W, int cull,
                                                                          unsigned long long* __restrict__ zbuf,
                                                                          const float4* __restrict__ pos) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        ScreenSetup setup{scr + (long long)b * V, pos + (long long)b * V};
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

// The forward's barycentrics in double (the twin: _pixel_bary_exact): pixel_bary's formula with
// float inputs made exact in double, so that the cancellation in x_k - X w_k, which in float moved
// the reprojected point of a triangle seen nearly edge-on by up to 2e-2 pixel, costs nothing that
// survives the final rounding to float.
struct ExactBary {
    double c0, c1, c2;
};

__device__ __forceinline__ ExactBary pixel_bary_exact(float4 p0, float4 p1, float4 p2, double X, double Y) {
    double a0x = (double)p0.x - X * (double)p0.w;
    double a0y = (double)p0.y - Y * (double)p0.w;
    double a1x = (double)p1.x - X * (double)p1.w;
    double a1y = (double)p1.y - Y * (double)p1.w;
    double a2x = (double)p2.x - X * (double)p2.w;
    double a2y = (double)p2.y - Y * (double)p2.w;
    ExactBary r;
    r.c0 = a1x * a2y - a1y * a2x;
    r.c1 = a2x * a0y - a2y * a0x;
    r.c2 = a0x * a1y - a0y * a1x;
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
                                              int W, double inv_w, double inv_h, const float* __restrict__ attr,
                                              int nc, int attr_batched,
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
    double X = (double)(2 * j + 1 - W) * inv_w;
    double Y = (double)(H - 2 * i - 1) * inv_h;
    ExactBary r = pixel_bary_exact(q0, q1, q2, X, Y);
    // u = c0 / s, v = c1 / s, and the NDC depth zc / wc of the clip point sum b_k p_k (the key's
    // depth is that of the snapped triangle): two independent divisions.
    double s = (r.c0 + r.c1) + r.c2;
    double zc = (r.c0 * (double)q0.z + r.c1 * (double)q1.z) + r.c2 * (double)q2.z;
    double wc = (r.c0 * (double)q0.w + r.c1 * (double)q1.w) + r.c2 * (double)q2.w;
    double rs = s != 0.0 ? 1.0 / s : 0.0;
    float u = (float)(r.c0 * rs);
    float v = (float)(r.c1 * rs);
    tri_id[p] = (int)t;
    bary[p] = make_float2(u, v);
    float z = wc != 0.0 ? (float)(zc / wc) : key_depth((unsigned int)(key >> 32));
    depth[p] = z < -1.0f ? -1.0f : (z > 1.0f ? 1.0f : z);  // the key's test: [-1, 1]
    float w2 = (1.0f - u) - v;
    if (C > 0) {
#pragma unroll
        for (int c = 0; c < CR; ++c) out[p * nc + c] = (u * r0[c] + v * r1[c]) + w2 * r2[c];
    } else if (C != 0) {
        for (int c = 0; c < nc; ++c) out[p * nc + c] = (u * a0[c] + v * a1[c]) + w2 * a2[c];
    }
}

// One thread per pixel (see PIXEL_LOOP for the launch shape): keys -> Raster arrays (+ attributes).
// inv_w, inv_h: 1 / W and 1 / H in double, made by the caller (the Numba twin's 1.0 / W): computed
// here they were two float64 reciprocals per thread, a long instruction sequence with a slow path.
template <int C>
__global__ void rasterize_resolve(const float4* __restrict__ pos, const int* __restrict__ tri,
                                  const unsigned long long* zbuf, int B, int V, int T, int H, int W, double inv_w,
                                  double inv_h, const float* __restrict__ attr, int n_ch, int attr_batched,
                                  int* __restrict__ tri_id, float2* bary, float* __restrict__ depth,
                                  float* __restrict__ out) {
    int nc = channels<C>(n_ch);
    PIXEL_LOOP {
        resolve_pixel<C>(pos, tri, zbuf, V, T, H, W, inv_w, inv_h, attr, nc, attr_batched, tri_id, bary, depth, out,
                         b, i, j, (long long)b * hw + q);
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
