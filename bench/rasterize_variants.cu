// Profiling variants of kernels/rasterize.cu, NOT used by the library (kept in bench/, not kernels/): bench/profile_rasterize.py
// appends this file to rasterize.cu's source and compiles both with the library's options, so that
// each variant times a change (or leaves a part out) around the very same device functions.

// Keeps the work of the sink alive without touching memory: the keys are folded into a register.
struct XorSink {
    unsigned long long* acc;
    __device__ __forceinline__ void operator()(int i, int j, unsigned long long key) const {
        *acc ^= key + (unsigned long long)(i * 4099 + j);
    }
};

// rasterize_fwd without the atomics (the write of zbuf[t] never happens: it only stops the
// compiler from deleting the work). Measures vertex loads + setup + edge tests + depth.
extern "C" __global__ void rasterize_fwd_no_atomics(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                    int B, int V, int T, int H, int W, int cull,
                                                    unsigned long long* __restrict__ zbuf) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    float half_w = (float)W * 0.5f, half_h = (float)H * 0.5f;
    unsigned long long acc = 0;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        ClipSetup setup{pos + (long long)b * V, half_w, half_h};
        XorSink sink{&acc};
        rasterize_triangle(setup, i0, i1, i2, t, H, W, cull, sink);
    }
    if (acc == 0x0123456789ABCDEFull) zbuf[t] = acc;
}

// The setup as it was before the loads were hoisted: each vertex loaded inside its own
// screen_vertex call (the compiler then serialised the three loads behind the divisions).
struct ClipSetupSerial {
    const float4* __restrict__ pb;
    float half_w, half_h;
    __device__ __forceinline__ void operator()(int i0, int i1, int i2, ScreenVertex& v0, ScreenVertex& v1,
                                               ScreenVertex& v2) const {
        v0 = screen_vertex(pb[i0], half_w, half_h);
        v1 = screen_vertex(pb[i1], half_w, half_h);
        v2 = screen_vertex(pb[i2], half_w, half_h);
    }
};

extern "C" __global__ void rasterize_fwd_serial_loads(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                      int B, int V, int T, int H, int W, int cull,
                                                      unsigned long long* __restrict__ zbuf) {
    triangle_pass<ClipSetupSerial>(pos, tri, B, V, T, H, W, cull, zbuf);
}

// Index loads + vertex loads + setup + bounding box only (no edges, no atomics).
extern "C" __global__ void rasterize_fwd_setup_only(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                    int B, int V, int T, int H, int W, int cull,
                                                    unsigned long long* __restrict__ zbuf) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    float half_w = (float)W * 0.5f, half_h = (float)H * 0.5f;
    float acc = 0.0f;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        ClipSetup setup{pos + (long long)b * V, half_w, half_h};
        ScreenVertex v0, v1, v2;
        setup(i0, i1, i2, v0, v1, v2);
        if (!(v0.valid && v1.valid && v2.valid)) continue;
        float ilo = fmaxf(ceilf(fminf(fminf(v0.y, v1.y), v2.y)), 0.0f);
        float ihi = fminf(floorf(fmaxf(fmaxf(v0.y, v1.y), v2.y)), (float)(H - 1));
        float jlo = fmaxf(ceilf(fminf(fminf(v0.x, v1.x), v2.x)), 0.0f);
        float jhi = fminf(floorf(fmaxf(fmaxf(v0.x, v1.x), v2.x)), (float)(W - 1));
        if (ilo > ihi || jlo > jhi) continue;
        acc += (ihi - ilo) * (jhi - jlo) + v0.z + v1.z + v2.z;
    }
    if (acc == -12345.0f) zbuf[t] = 1;
}

// rasterize_resolve<0> that also writes the empty key back, leaving the buffer ready for the next
// call (which could then skip its memset if the buffer were kept between calls).
extern "C" __global__ void rasterize_resolve_clear0(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                    unsigned long long* zbuf, int B, int V, int T, int H, int W,
                                                    double inv_w, double inv_h, int* __restrict__ tri_id,
                                                    float2* __restrict__ bary, float* __restrict__ depth) {
    PIXEL_LOOP {
        long long p = (long long)b * hw + q;
        resolve_pixel<0>(pos, tri, zbuf, V, T, H, W, inv_w, inv_h, nullptr, 0, 0, tri_id, bary, depth, nullptr, b, i,
                         j, p);
        zbuf[p] = EMPTY_KEY;
    }
}

// Busy-waits ns nanoseconds (one thread): queued before a timed loop, it keeps the GPU busy while
// Python enqueues the timed launches, so that the events measure the kernels, not the launches.
extern "C" __global__ void spin_ns(long long ns) {
    long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}

// The triangle pass before commit 8ba8227 (canonical edge direction and sign, short-circuit
// validity, nested row/column loops), for a before/after row: the same keys.
struct EdgeV1 {
    float ox, oy, dx, dy, s;
    bool own;
};

__device__ __forceinline__ EdgeV1 canonical_edge_v1(float ax, float ay, float bx, float by) {
    EdgeV1 e;
    if (ax < bx || (ax == bx && ay < by)) {
        e.ox = ax; e.oy = ay; e.dx = bx - ax; e.dy = by - ay; e.s = 1.0f;
    } else {
        e.ox = bx; e.oy = by; e.dx = ax - bx; e.dy = ay - by; e.s = -1.0f;
    }
    e.own = false;
    return e;
}

__device__ __forceinline__ void orient_edge_v1(EdgeV1& e, float o) {
    e.s = e.s * o;
    float ny = e.s * e.dy;
    e.own = (ny < 0.0f) | ((ny == 0.0f) & (e.s * e.dx > 0.0f));
}

__device__ __forceinline__ float edge_value_v1(const EdgeV1& e, float px, float py) {
    return e.s * (e.dx * (py - e.oy) - e.dy * (px - e.ox));
}

__device__ __forceinline__ bool edge_inside_v1(const EdgeV1& e, float v) {
    return (v > 0.0f) | ((v == 0.0f) & e.own);
}

extern "C" __global__ void rasterize_fwd_v1(const float4* __restrict__ pos, const int* __restrict__ tri, int B,
                                            int V, int T, int H, int W, int cull,
                                            unsigned long long* __restrict__ zbuf) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int i0 = tri[3LL * t], i1 = tri[3LL * t + 1], i2 = tri[3LL * t + 2];
    if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return;
    float half_w = (float)W * 0.5f, half_h = (float)H * 0.5f;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const float4* pb = pos + (long long)b * V;
        AtomicMinSink sink{zbuf + (long long)b * H * W, W};
        float4 p0 = pb[i0], p1 = pb[i1], p2 = pb[i2];
        ScreenVertex v0 = screen_vertex(p0, half_w, half_h);
        ScreenVertex v1 = screen_vertex(p1, half_w, half_h);
        ScreenVertex v2 = screen_vertex(p2, half_w, half_h);
        if (!(v0.valid && v1.valid && v2.valid)) continue;
        float ilo = fmaxf(ceilf(fminf(fminf(v0.y, v1.y), v2.y)), 0.0f);
        float ihi = fminf(floorf(fmaxf(fmaxf(v0.y, v1.y), v2.y)), (float)(H - 1));
        float jlo = fmaxf(ceilf(fminf(fminf(v0.x, v1.x), v2.x)), 0.0f);
        float jhi = fminf(floorf(fmaxf(fmaxf(v0.x, v1.x), v2.x)), (float)(W - 1));
        if (ilo > ihi || jlo > jhi) continue;
        EdgeV1 e0 = canonical_edge_v1(v1.x, v1.y, v2.x, v2.y);
        EdgeV1 e1 = canonical_edge_v1(v2.x, v2.y, v0.x, v0.y);
        EdgeV1 e2 = canonical_edge_v1(v0.x, v0.y, v1.x, v1.y);
        float area = e2.s * (e2.dx * (v2.y - e2.oy) - e2.dy * (v2.x - e2.ox));
        if (area == 0.0f) continue;
        if (cull && area > 0.0f) continue;
        float o = area > 0.0f ? 1.0f : -1.0f;
        orient_edge_v1(e0, o);
        orient_edge_v1(e1, o);
        orient_edge_v1(e2, o);
        int i_end = (int)ihi, j_begin = (int)jlo, j_end = (int)jhi;
        for (int i = (int)ilo; i <= i_end; ++i) {
            float py = (float)i;
            for (int j = j_begin; j <= j_end; ++j) {
                float px = (float)j;
                float w0 = edge_value_v1(e0, px, py);
                float w1 = edge_value_v1(e1, px, py);
                float w2 = edge_value_v1(e2, px, py);
                if (!(edge_inside_v1(e0, w0) & edge_inside_v1(e1, w1) & edge_inside_v1(e2, w2))) continue;
                float z = (w0 * v0.z + w1 * v1.z + w2 * v2.z) / (w0 + w1 + w2);
                if (!(z >= -1.0f && z <= 1.0f)) continue;
                sink(i, j, ((unsigned long long)depth_key(z) << 32) | (unsigned int)t);
            }
        }
    }
}

// rasterize_resolve<3> with two horizontally adjacent pixels per thread (W even, so a pair never
// straddles two rows): the two keys come in one 16-byte load, and tri_id, bary, depth and the
// colours go out in 8- and 16-byte stores. Each thread then has two independent chains of
// dependent loads (key -> triangle -> positions and colours) in flight instead of one. The
// resolve ran at about half the copy rate in run 3, which suggests it is latency-bound. The
// arithmetic is resolve_pixel's, in the same order, so the outputs must be bit-identical.
struct ResolvedPixel3 {
    int t;
    float u, v, depth, c[3];
};

__device__ __forceinline__ ResolvedPixel3 resolve_value3(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                         unsigned long long key, int V, int T, int H, int W,
                                                         const float* __restrict__ attr, int attr_batched, int b, int i,
                                                         int j) {
    ResolvedPixel3 r;
    int i0, i1, i2;
    if (key == EMPTY_KEY || !triangle_corners(tri, (unsigned int)(key & 0xFFFFFFFFull), T, V, i0, i1, i2)) {
        r.t = -1;
        r.u = r.v = 0.0f;
        r.depth = __int_as_float(0x7F800000);
        r.c[0] = r.c[1] = r.c[2] = 0.0f;
        return r;
    }
    const float4* pb = pos + (long long)b * V;
    float4 q0 = pb[i0], q1 = pb[i1], q2 = pb[i2];
    const float* ab = attr + (attr_batched ? (long long)b * V * 3 : 0LL);
    float r0[3], r1[3], r2[3];
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        r0[c] = ab[3LL * i0 + c];
        r1[c] = ab[3LL * i1 + c];
        r2[c] = ab[3LL * i2 + c];
    }
    float X = (float)(2 * j + 1 - W) / (float)W;
    float Y = (float)(H - 2 * i - 1) / (float)H;
    PixelBary pbary = pixel_bary(q0, q1, q2, X, Y);
    r.u = pbary.s != 0.0f ? pbary.c0 / pbary.s : 0.0f;
    r.v = pbary.s != 0.0f ? pbary.c1 / pbary.s : 0.0f;
    r.t = (int)(key & 0xFFFFFFFFull);
    r.depth = key_depth((unsigned int)(key >> 32));
    float w2 = (1.0f - r.u) - r.v;
#pragma unroll
    for (int c = 0; c < 3; ++c) r.c[c] = (r.u * r0[c] + r.v * r1[c]) + w2 * r2[c];
    return r;
}

// Grid: x over the H*W/2 pixel pairs of an image, y over images (a strided loop past 65535), as
// PIXEL_LOOP. zbuf may alias bary (the library keeps the keys there): a thread reads its two keys
// before it writes the two pixels' barycentrics.
extern "C" __global__ void rasterize_resolve_pairs3(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                    const unsigned long long* zbuf, int B, int V, int T, int H, int W,
                                                    const float* __restrict__ attr, int attr_batched,
                                                    int* __restrict__ tri_id, float2* bary,
                                                    float* __restrict__ depth, float* __restrict__ out) {
    int q = blockIdx.x * blockDim.x + threadIdx.x;
    int hw = H * W;
    if (2 * q >= hw) return;
    int i = (2 * q) / W;
    int j = 2 * q - i * W;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long pair = (long long)b * (hw / 2) + q;
        ulonglong2 keys = reinterpret_cast<const ulonglong2*>(zbuf)[pair];
        ResolvedPixel3 a = resolve_value3(pos, tri, keys.x, V, T, H, W, attr, attr_batched, b, i, j);
        ResolvedPixel3 c = resolve_value3(pos, tri, keys.y, V, T, H, W, attr, attr_batched, b, i, j + 1);
        reinterpret_cast<int2*>(tri_id)[pair] = make_int2(a.t, c.t);
        reinterpret_cast<float4*>(bary)[pair] = make_float4(a.u, a.v, c.u, c.v);
        reinterpret_cast<float2*>(depth)[pair] = make_float2(a.depth, c.depth);
        float2* o = reinterpret_cast<float2*>(out + 6 * pair);  // 24 bytes a pair: 8-byte aligned
        o[0] = make_float2(a.c[0], a.c[1]);
        o[1] = make_float2(a.c[2], c.c[0]);
        o[2] = make_float2(c.c[1], c.c[2]);
    }
}

// The library's kernel with room for about 85 registers (3 blocks of 256 threads per SM instead of 4 of
// 256 under 512 x 2): no spills of the loop-invariant thresholds, at a lower occupancy.
extern "C" __global__ void __launch_bounds__(256, 3) rasterize_fwd_bound_256x3(
    const float4* __restrict__ pos, const int* __restrict__ tri, int B, int V, int T, int H, int W, int cull,
    unsigned long long* __restrict__ zbuf) {
    triangle_pass<ClipSetup>(pos, tri, B, V, T, H, W, cull, zbuf);
}

// The fast test of all three corners first, the out-of-line band test only after it, for the corners
// that failed: the thresholds of the fast test are then dead across the call, so its clobbers no
// longer make the hot path reload them from the stack (6 spill loads per triangle in rasterize_fwd);
// and the validity test runs only where the fast test fails (fast implies valid: a finite, positive w
// and finite screen x, y, z need finite clip x, y, z). The same ScreenVertex, so the same keys.
struct ClipSetupFastFirst {
    const float4* __restrict__ pb;
    float half_w, half_h;
    __device__ __forceinline__ ScreenVertex fast_part(float4 p, int W, int H) const {
        ScreenVertex s;
        float rw = 1.0f / p.w;
        s.x = (p.x * rw + 1.0f) * half_w - 0.5f;
        s.y = (1.0f - p.y * rw) * half_h - 0.5f;
        s.z = p.z * rw;
        float inf = __int_as_float(0x7F800000);
        s.fast = (p.w > 0.0f) & (p.w < inf) & (fabsf(s.x - half_w) < (float)(W / 2 + GUARD_BAND - 64)) &
                 (fabsf(s.y - half_h) < (float)(H / 2 + GUARD_BAND - 64)) & (fabsf(s.z) < inf);
        s.valid = s.fast;
        return s;
    }
    __device__ __forceinline__ void slow_part(ScreenVertex& s, float4 p, int W, int H) const {
        s.valid = (p.w > 0.0f) & isfinite(p.x) & isfinite(p.y) & isfinite(p.z) & isfinite(p.w);
        if (s.valid) s.fast = isfinite(s.x) & isfinite(s.y) & isfinite(s.z) && inside_band(p, H, W);
    }
    __device__ __forceinline__ void operator()(int i0, int i1, int i2, ScreenVertex& v0, ScreenVertex& v1,
                                               ScreenVertex& v2) const {
        float4 p0 = pb[i0], p1 = pb[i1], p2 = pb[i2];
        int W = (int)(2.0f * half_w), H = (int)(2.0f * half_h);
        v0 = fast_part(p0, W, H);
        v1 = fast_part(p1, W, H);
        v2 = fast_part(p2, W, H);
        if (!(v0.fast & v1.fast & v2.fast)) {
            if (!v0.fast) slow_part(v0, p0, W, H);
            if (!v1.fast) slow_part(v1, p1, W, H);
            if (!v2.fast) slow_part(v2, p2, W, H);
        }
        v0.X = v0.fast ? snap(v0.x) : 0;
        v0.Y = v0.fast ? snap(v0.y) : 0;
        v1.X = v1.fast ? snap(v1.x) : 0;
        v1.Y = v1.fast ? snap(v1.y) : 0;
        v2.X = v2.fast ? snap(v2.x) : 0;
        v2.Y = v2.fast ? snap(v2.y) : 0;
    }
};

extern "C" __global__ void __launch_bounds__(512, 2) rasterize_fwd_fast_first(
    const float4* __restrict__ pos, const int* __restrict__ tri, int B, int V, int T, int H, int W, int cull,
    unsigned long long* __restrict__ zbuf) {
    triangle_pass<ClipSetupFastFirst>(pos, tri, B, V, T, H, W, cull, zbuf);
}
