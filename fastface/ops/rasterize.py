"""Rasterization: which triangle covers each pixel centre, with perspective-correct barycentrics.

Conventions (docs/conventions.md): pixel (i, j) has its centre at NDC x = 2(j+0.5)/W - 1, y = 1 - 2(i+0.5)/H;
positions are OpenGL clip space (x, y, z, w); counter-clockwise seen from the camera is front-facing;
`bary[..., 0:2]` are the perspective-correct weights of a triangle's vertices 0 and 1.

The algorithm, the same on both backends:

1. Setup of one vertex, in the working float type (float32 on the hot path), always with the same
   operations in the same order:  rw = 1/w;  sx = (x*rw + 1)*(W/2) - 1/2;  sy = (1 - y*rw)*(H/2) - 1/2;
   zn = z*rw. (sx, sy) are pixel coordinates with y pointing down and pixel centres at integers.
   A vertex with w <= 0 or a non-finite coordinate is dropped, and so is every triangle it belongs
   to: there is no clipping at the camera plane. A vertex inside the guard band (GUARD_BAND = 8192
   pixels beyond each side of the screen: |x| <= (W + 2 GUARD_BAND)/W w and likewise y, tested
   exactly in float64 where a float test with a 64-pixel margin does not already settle it) whose
   sx, sy, zn are finite takes the fast path: its position is snapped to
   the fixed-point grid, X = rint(256 sx), Y = rint(256 sy) (8 bits of subpixel precision, as GPUs).
   Any other valid vertex makes its triangles go through the clipper (step 2b).
2. One pass per triangle (a thread per triangle and image on the GPU): the bounding box over pixel
   centres, exact integer edge tests at each centre inside it, the NDC depth there, and a 64-bit min
   into a per-image buffer of keys  (depth key << 32) | triangle id,  initialised to all ones. The
   depth key is the float32 bit pattern of z (+0 added, which folds -0 onto +0) made
   order-preserving as an unsigned integer, so the min picks the nearest fragment, and among equal
   depths the lower triangle id: the result does not depend on the order in which triangles or
   threads run. Fragments with NDC z outside [-1, 1] (in front of the near plane, z < -w, or behind
   the far plane) are dropped; z = -w exactly (NDC -1) is kept. The depth of the key is interpolated
   with the exact edge values, that is on the snapped triangle, as on GPUs (a triangle of constant
   depth keeps it exactly).
2b. The clipper (rare: a corner beyond the guard band, e.g. at NDC 1e19, or at w = 1e-37):
   Sutherland-Hodgman against the four band planes in float64 homogeneous 2-D coordinates (x, y, w),
   each cut point computed as the cross product of a triangle edge's line (itself the cross product
   of the edge's endpoints) with the plane, which stays accurate at any scale; the clipped polygon's
   corners are snapped (triangle corners on the fast path keep their snapped position) and its fan
   rasterized as in step 2 under the triangle's id. The band lies far outside the screen, so the cut
   edges along it cover no pixel centre.
3. One pass per pixel: unpack the winning triangle id, compute perspective-correct barycentrics and
   the depth from the clip positions. The barycentrics are c_k = a_{k+1} x a_{k+2} with
   a_k = (x_k - X w_k, y_k - Y w_k) for the pixel's NDC (X, Y) (the homogeneous edge functions
   (p_{k+1} x p_{k+2}) . (X, Y, 1) of p_k = (x_k, y_k, w_k)), computed in float64,
   u = c_0 / s, v = c_1 / s with s = c_0 + c_1 + c_2, then rounded: in float64
   the cancellation of x_k - X w_k that float32 suffers on triangles seen nearly edge-on is harmless,
   and the weights reproject onto the pixel centre within about 1e-5 pixel of the float32-rounded
   exact ones. The depth output is the NDC z of the clip point sum b_k p_k, also in float64 and
   clamped to [-1, 1] (so it does not carry the snapping of the key's depth).

Coverage and the tie rule (why it is watertight by construction). The edge function of the directed
edge a->b at a point p is E_ab(p) = (b.x - a.x)(p.y - a.y) - (b.y - a.y)(p.x - a.x). On the fixed-point
grid every term is an integer: a snapped coordinate stays below 2^23 in magnitude (inside the band,
with H, W <= 16384), a difference below 2^24, and E below 2^50, so long long on the GPU (from
32 x 32 -> 64-bit products) holds it exactly, and so does float64 on the CPU, where every value is an
integer below 2^53 and every sum, difference and product of them is therefore exact: the same integers
as int64 (which measured 15% slower in Numba's triangle pass). E_ab(p) = -E_ba(p) exactly, whatever
origin it is evaluated from. Both backends evaluate E at the first centre of a triangle's box and step
it from centre to centre (E(p + 1 column) = E(p) - dy 256, E(p + 1 row) = E(p) + dx 256: exact in
integers, so every centre gets the value evaluating there gives); the GPU steps in 32-bit int where
the triangle's vertices lie within 2^14 subpixels (64 pixels) of each other, which bounds every value
the loop makes by 2^30, and in long long otherwise. Each triangle's directions are multiplied by the
sign of its area so that its interior is where all three edge values are positive. A centre is
covered when every edge value is > 0, or == 0 on an edge that owns its centres: the edge whose
oriented direction d satisfies d.y < 0, or d.y == 0 and d.x > 0 (in the y-down pixel frame, the
triangle's left edges and horizontal top edges: the usual top-left rule), tested as E >= 0 on an
owning edge and E >= 1 on the others (the CPU tells an owning d by d.y 2^25 - d.x < 0, exact for
|d.x| < 2^24: one comparison where the two-clause test cost mispredicted branches). For an edge
shared by two triangles the oriented directions are opposite, and exactly one of d and -d owns, so a
centre on the shared edge goes to exactly one of them. A centre exactly on a snapped vertex gets an
exact 0 from both incident edges, and going around a closed fan of triangles the owning directions
form a half-open half-plane, so exactly one triangle of the fan takes it. The
clipper keeps this: whether a shared edge is cut, and where, depends only on its endpoints. Floats
(depths, barycentrics) are computed without fused multiply-adds on both backends (the CUDA module is
compiled with --fmad=false; Numba does not contract without fastmath), which makes the GPU results
match the CPU bit for bit up to summation order.

Empty pixels have tri_id -1, bary 0 and depth +inf.

Backends. The CPU (Numba) runs steps 1-3 per (image, band of rows) with a private z-buffer, so it
needs no atomics and the buffer stays in cache; step 1 runs once per vertex there and once per
triangle corner on the GPU (or once per vertex in a pass of its own with _FWD_PREPASS), with the
same arithmetic. The GPU (kernels/rasterize.cu) runs step 2 as a thread per (triangle, image) with
a 64-bit atomicMin, and step 3 as a thread per pixel.
`rasterize_interpolate` fuses `interpolate` into step 3 (and its backward into one pass), saving
a launch and a round trip of tri_id and bary through memory: the fast path of the render chain.
"""
import collections
import functools
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

from fastface import _checks
from fastface._backend import KernelFile, array_module

__all__ = [
    "Raster", "rasterize", "rasterize_backward", "rasterize_interpolate", "rasterize_interpolate_backward",
]

EMPTY_DEPTH = np.inf
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN32 = np.uint64(0x80000000)
_SHIFT32 = np.uint64(32)


@dataclass(frozen=True)
class Raster:
    """The result of `rasterize`.

    Attributes:
        tri_id: (B, H, W) int32, the index of the triangle covering each pixel centre; -1 if none.
        bary: (B, H, W, 2) float32 (float64 for float64 positions on the CPU), perspective-correct
            weights of the triangle's vertices 0 and 1 (vertex 2 gets 1 - u - v); 0 where empty.
        depth: (B, H, W) float32 (float64 likewise), NDC z of the visible surface at the pixel
            centre (from the clip positions, in float64, clamped to [-1, 1]); +inf where empty.
    """
    tri_id: object
    bary: object
    depth: object


# --------------------------------------------------------------------------------------------------
# Numba twins of kernels/rasterize.cu. Every float expression below is written in the same order as
# in the CUDA source; constants are made in the working float type (a bare Python float would
# promote float32 arithmetic to float64 in Numba and break bit-for-bit agreement with the GPU).
# --------------------------------------------------------------------------------------------------

# Fixed point: screen positions are snapped to 1/SUBPIXEL_SCALE of a pixel (8 bits, as GPUs do), and
# every vertex the fast path takes lies inside the guard band, GUARD_BAND pixels beyond each side of
# the screen. With H, W <= 16384 a snapped coordinate then stays below 2^23 in magnitude, a difference
# of two below 2^24, and an edge value (a difference of two products of such differences) below 2^50:
# exact in int64 (long long on the GPU), whose 32 x 32 -> 64-bit products the GPU makes in one
# instruction. Vertices outside the band (or whose float setup overflows) are clipped against it in
# float64 (_raster_clipped), so no triangle is ever dropped for its size.
SUBPIXEL_BITS = 8
SUBPIXEL_SCALE = 1 << SUBPIXEL_BITS
GUARD_BAND = 8192

# Vertex classes of the setup (scr[v, 3]): dropped (w <= 0 or not finite), inside the guard band
# (snapped in the working float type), valid but outside the band (the triangle is clipped).
_VERTEX_DROPPED = 0
_VERTEX_FAST = 1
_VERTEX_CLIP = 2


@numba.njit(cache=True, error_model="numpy")
def _plane_distance(k, H, W, x, y, w):
    """Signed distance (float64, scaled by W or H) of a clip point to guard-band plane k (x <= gx w,
    -x <= gx w, y <= gy w, -y <= gy w with gx = (W + 2 GUARD_BAND) / W): >= 0 is inside. Written
    without a division, so that for float32 inputs every product is exact in float64 and the test of
    a vertex is exact."""
    if k == 0:
        return np.float64(W + 2 * GUARD_BAND) * w - np.float64(W) * x
    if k == 1:
        return np.float64(W + 2 * GUARD_BAND) * w + np.float64(W) * x
    if k == 2:
        return np.float64(H + 2 * GUARD_BAND) * w - np.float64(H) * y
    return np.float64(H + 2 * GUARD_BAND) * w + np.float64(H) * y


@numba.njit(cache=True, error_model="numpy")
def _snap(s):
    """The fixed-point grid coordinate of a screen coordinate: round half to even of s * 256 (a
    scaling by a power of two, exact in float32 and float64 alike)."""
    return np.int64(np.rint(np.float64(s) * np.float64(SUBPIXEL_SCALE)))


@numba.njit(cache=True, error_model="numpy")
def _screen_vertices(pos_b, H, W, scr):
    """Per-vertex setup of step 1 for one image: scr[v] = (X, Y, zn, class), X and Y the snapped
    position (integers below 2^23, exact in float32) of a fast vertex, 0 for the others: one row of
    16 bytes a vertex (in float32), read once per triangle corner."""
    one = pos_b.dtype.type(1)
    half = pos_b.dtype.type(0.5)
    half_w = pos_b.dtype.type(W) * half
    half_h = pos_b.dtype.type(H) * half
    zero = one - one
    scale = pos_b.dtype.type(SUBPIXEL_SCALE)
    margin_w = pos_b.dtype.type(W // 2 + GUARD_BAND - 64)
    margin_h = pos_b.dtype.type(H // 2 + GUARD_BAND - 64)
    for v in range(pos_b.shape[0]):
        x, y, z, w = pos_b[v, 0], pos_b[v, 1], pos_b[v, 2], pos_b[v, 3]
        rw = one / w
        sx = (x * rw + one) * half_w - half
        sy = (one - y * rw) * half_h - half
        zn = z * rw
        # Fast: inside the guard band (the signs of the four _plane_distance values, exact comparisons
        # of float64 products) with a finite setup. A float test with a margin of 64 pixels, which
        # implies it (and that x, y, z, w are finite), settles nearly every vertex at less cost.
        if (w > 0 and w < np.inf and abs(sx - half_w) < margin_w and abs(sy - half_h) < margin_h
                and abs(zn) < np.inf):
            cls = _VERTEX_FAST
        elif w > 0 and np.isfinite(x) and np.isfinite(y) and np.isfinite(z) and np.isfinite(w):
            cls = _VERTEX_CLIP
            wd = np.float64(w)
            if (np.isfinite(sx) and np.isfinite(sy) and np.isfinite(zn)
                    and abs(np.float64(W) * np.float64(x)) <= np.float64(W + 2 * GUARD_BAND) * wd
                    and abs(np.float64(H) * np.float64(y)) <= np.float64(H + 2 * GUARD_BAND) * wd):
                cls = _VERTEX_FAST
        else:
            cls = _VERTEX_DROPPED
        # The snapped position, as the working float type (exact: |256 sx| < 2^23 inside the band).
        scr[v, 0] = np.rint(sx * scale) if cls == _VERTEX_FAST else zero
        scr[v, 1] = np.rint(sy * scale) if cls == _VERTEX_FAST else zero
        scr[v, 2] = zn
        scr[v, 3] = cls


@numba.njit(cache=True, error_model="numpy", inline="always")
def _edge_threshold(dx, dy):
    """The least value of an edge that takes a centre: 0 on an owning edge (top-left rule: the
    oriented direction has dy < 0, or dy == 0 and dx > 0), else 1; edge values are integers, so
    e >= threshold is e > 0 or (e == 0 and the edge owns).

    The rule as one comparison of exact float64 integers: |dx| < 2^24 (see the module docstring), so
    dy * 2^25 - dx is negative exactly when dy <= -1, or dy == 0 and dx > 0. Written with `or` and
    `and`, the three branches per edge were mispredicted often enough to cost 8% of the triangle pass.
    """
    return 0.0 if dy * np.float64(1 << 25) - dx < 0 else 1.0


@numba.njit(cache=True, error_model="numpy")
def _depth_key(z):
    """Order-preserving unsigned 32-bit key of float32(z) (as uint64); -0 is folded onto +0."""
    bits = np.uint64(np.float32(np.float32(z) + np.float32(0)).view(np.uint32))  # -0 + 0 = +0
    if bits >= _SIGN32:
        return _LOW32 - bits
    return bits + _SIGN32


@numba.njit(cache=True, error_model="numpy")
def _key_depth(key32):
    """Inverse of _depth_key: the float32 depth of a key."""
    if key32 >= _SIGN32:
        bits = key32 - _SIGN32
    else:
        bits = _LOW32 - key32
    return np.uint32(bits).view(np.float32)


@numba.njit(cache=True, error_model="numpy", inline="always")
def _centre_box(ft, fX0, fY0, fX1, fY1, fX2, fY2, W, r0, r1):
    """The bounding box over pixel centres (centre (i, j) at (j, i) * 256) of a triangle on the grid
    (fX_k, fY_k: snapped positions, integers held exactly in the working float type of the array
    ft), clamped to the columns and the rows [r0, r1): ceil and floor of the coordinates / 256, exact
    in float (kernels/rasterize.cu: the same with integer shifts). As floats: empty when ilo > ihi
    or jlo > jhi."""
    inv = ft.dtype.type(1.0 / SUBPIXEL_SCALE)
    ilo = max(np.ceil(min(fY0, fY1, fY2) * inv), ft.dtype.type(r0))
    ihi = min(np.floor(max(fY0, fY1, fY2) * inv), ft.dtype.type(r1 - 1))
    jlo = max(np.ceil(min(fX0, fX1, fX2) * inv), ft.dtype.type(0))
    jhi = min(np.floor(max(fX0, fX1, fX2) * inv), ft.dtype.type(W - 1))
    return ilo, ihi, jlo, jhi


@numba.njit(cache=True, error_model="numpy", inline="always")
def _raster_fixed(ft, fX0, fY0, z0, fX1, fY1, z1, fX2, fY2, z2, t, W, r0, cull, zbuf, ilo, ihi, jlo, jhi):
    """Step 2 of one triangle in its (non-empty) box of centres [ilo, ihi] x [jlo, jhi] (from
    _centre_box: the caller tests the box first, since most triangles of a fine mesh hold no centre
    at all): zbuf[(i - r0) * W + j] = min(key).

    Coverage on the fixed-point grid (fX_k, fY_k: the snapped position, integers held exactly in the
    working float type, that of the array ft), and the depth of the key interpolated there from the
    exact edge values, z = sum e_k z_k / sum e_k with the NDC depths z_k, as GPUs do: the depth test
    sees the snapped triangle (the resolve recomputes the depth it outputs from the clip positions).
    The edge arithmetic is integer arithmetic carried in float64: every value is an integer below 2^50
    (see the module docstring), so each operation is exact and gives kernels/rasterize.cu's long long
    numbers, at less cost than int64 in Numba.
    """
    X0, Y0, X1, Y1, X2, Y2 = (np.float64(fX0), np.float64(fY0), np.float64(fX1), np.float64(fY1), np.float64(fX2),
                              np.float64(fY2))
    one = ft.dtype.type(1)
    area = (X1 - X0) * (Y2 - Y0) - (Y1 - Y0) * (X2 - X0)
    if area == 0:
        return
    if cull and area > 0:  # y-down pixel frame: counter-clockwise on screen has area < 0
        return
    o = 1.0 if area > 0 else -1.0
    # Edge k runs from vertex k+1 to vertex k+2 (opposite vertex k), oriented so that the interior
    # is where all three values are positive; E_k(p) = dx_k (p.y - a.y) - dy_k (p.x - a.x).
    dx0, dy0 = o * (X2 - X1), o * (Y2 - Y1)
    dx1, dy1 = o * (X0 - X2), o * (Y0 - Y2)
    dx2, dy2 = o * (X1 - X0), o * (Y1 - Y0)
    t0, t1, t2 = _edge_threshold(dx0, dy0), _edge_threshold(dx1, dy1), _edge_threshold(dx2, dy2)
    tid = np.uint64(t)
    # Integer values step exactly, so stepping gives the numbers that the GPU's evaluation at each
    # centre gives. The box's centres in row-major order as one flat loop, as on the GPU: most boxes
    # hold one or two centres, and the exits of two nested loops of such short, varying lengths
    # were mispredicted branches that cost 7% of the triangle pass.
    step = np.float64(SUBPIXEL_SCALE)
    sx0, sx1, sx2 = dy0 * step, dy1 * step, dy2 * step  # E(p + 1 column) = E(p) - dy * 256
    sy0, sy1, sy2 = dx0 * step, dx1 * step, dx2 * step  # E(p + 1 row) = E(p) + dx * 256
    px, py = np.float64(jlo * SUBPIXEL_SCALE), np.float64(ilo * SUBPIXEL_SCALE)
    r0e0 = dx0 * (py - Y1) - dy0 * (px - X1)  # the values at the first centre of the current row
    r0e1 = dx1 * (py - Y2) - dy1 * (px - X2)
    r0e2 = dx2 * (py - Y0) - dy2 * (px - X0)
    e0, e1, e2 = r0e0, r0e1, r0e2
    n_cols = jhi - jlo + 1
    k = (ilo - r0) * W + jlo  # index into zbuf
    col = 0
    for _ in range((ihi - ilo + 1) * n_cols):
        if (e0 >= t0) & (e1 >= t1) & (e2 >= t2):
            f0, f1, f2 = ft.dtype.type(e0), ft.dtype.type(e1), ft.dtype.type(e2)
            z = (f0 * z0 + f1 * z1 + f2 * z2) / (f0 + f1 + f2)
            if (z >= -one) & (z <= one):
                key = (_depth_key(z) << _SHIFT32) | tid
                if key < zbuf[k]:
                    zbuf[k] = key
        col += 1
        wrap = col == n_cols
        r0e0 = r0e0 + sy0 if wrap else r0e0
        r0e1 = r0e1 + sy1 if wrap else r0e1
        r0e2 = r0e2 + sy2 if wrap else r0e2
        e0 = r0e0 if wrap else e0 - sx0
        e1 = r0e1 if wrap else e1 - sx1
        e2 = r0e2 if wrap else e2 - sx2
        k = k + (W - n_cols + 1) if wrap else k + 1
        col = 0 if wrap else col


@numba.njit(cache=True, error_model="numpy")
def _cross(ax, ay, aw, bx, by, bw):
    """The 3-D cross product: the line through two homogeneous 2-D points, or the point on two lines."""
    return ay * bw - aw * by, aw * bx - ax * bw, ax * by - ay * bx


@numba.njit(cache=True, error_model="numpy")
def _plane_line(k, H, W):
    """Guard-band plane k as a homogeneous line (a, b, c): _plane_distance is a x + b y + c w."""
    if k == 0:
        return -np.float64(W), 0.0, np.float64(W + 2 * GUARD_BAND)
    if k == 1:
        return np.float64(W), 0.0, np.float64(W + 2 * GUARD_BAND)
    if k == 2:
        return 0.0, -np.float64(H), np.float64(H + 2 * GUARD_BAND)
    return 0.0, np.float64(H), np.float64(H + 2 * GUARD_BAND)


@numba.njit(cache=True, error_model="numpy")
def _finite_depth(ft, z):
    """z as a finite value of the working type (an infinite depth would make 0 * inf); NaN goes beyond
    the far plane."""
    zmax = np.float64(np.finfo(ft.dtype).max)
    if not (z == z):
        return ft.dtype.type(2)
    return ft.dtype.type(min(max(z, -zmax), zmax))


@numba.njit(cache=True, error_model="numpy")
def _raster_clipped(ft, pos_b, scr, i0, i1, i2, t, H, W, r0, r1, cull, zbuf, poly, lines):
    """Step 2 of a triangle with a corner off the fast path: Sutherland-Hodgman against the four guard
    band planes, in float64 homogeneous 2-D coordinates (x, y, w), then the fan of the clipped
    polygon on the fixed-point grid (the same operations as rasterize_clipped in kernels/rasterize.cu).

    Every corner of the polygon is a triangle corner, or the point where a triangle edge's line (the
    cross product of its endpoints, exact up to one rounding per component for float32 positions)
    meets a band plane, or a band corner: computed as the cross product of the two lines, it stays
    accurate whatever the size of the coordinates (a cut point interpolated between a vertex at 1e19
    and one near the screen would not). Whether an edge is cut, and where, depends only on the edge's
    endpoints (the line of a reversed edge is exactly the negated line), so a triangle sharing the
    edge cuts it at the same points; corners kept from the triangle keep their fast-path snapped
    positions. The depth of a cut point comes from its perspective-correct barycentrics (the c_k of
    _pixel_bary_exact at the point). poly (2, 8, 5) float64 is scratch (x, y, w, corner index or -1,
    the line of the edge leaving the corner), lines (7, 3) float64 the three edge lines and the
    four planes.
    """
    idx = (i0, i1, i2)
    for k in range(3):
        a, b = idx[(k + 1) % 3], idx[(k + 2) % 3]
        lx, ly, lw = _cross(np.float64(pos_b[a, 0]), np.float64(pos_b[a, 1]), np.float64(pos_b[a, 3]),
                            np.float64(pos_b[b, 0]), np.float64(pos_b[b, 1]), np.float64(pos_b[b, 3]))
        lines[k, 0], lines[k, 1], lines[k, 2] = lx, ly, lw
        v = idx[k]
        poly[0, k, 0] = np.float64(pos_b[v, 0])
        poly[0, k, 1] = np.float64(pos_b[v, 1])
        poly[0, k, 2] = np.float64(pos_b[v, 3])
        poly[0, k, 3] = k
        poly[0, k, 4] = (k + 2) % 3  # the edge from corner k to corner k + 1 is edge k + 2
    for k in range(4):
        lines[3 + k, 0], lines[3 + k, 1], lines[3 + k, 2] = _plane_line(k, H, W)
    n = 3
    src = 0
    for plane in range(4):
        dst = 1 - src
        m = 0
        for k in range(n):
            q = k + 1 if k + 1 < n else 0
            dp = _plane_distance(plane, H, W, poly[src, k, 0], poly[src, k, 1], poly[src, k, 2])
            dq = _plane_distance(plane, H, W, poly[src, q, 0], poly[src, q, 1], poly[src, q, 2])
            if dp >= 0:
                for c in range(5):
                    poly[dst, m, c] = poly[src, k, c]
                m += 1
            if (dp >= 0) != (dq >= 0):
                e = int(poly[src, k, 4])
                rx, ry, rw = _cross(lines[e, 0], lines[e, 1], lines[e, 2],
                                    lines[3 + plane, 0], lines[3 + plane, 1], lines[3 + plane, 2])
                if rw < 0:
                    rx, ry, rw = -rx, -ry, -rw
                if rw > 0:  # else parallel by rounding: no point
                    poly[dst, m, 0] = rx
                    poly[dst, m, 1] = ry
                    poly[dst, m, 2] = rw
                    poly[dst, m, 3] = -1.0
                    # Leaving the half-plane, the polygon follows the plane; entering, the edge.
                    poly[dst, m, 4] = 3 + plane if dp >= 0 else e
                    m += 1
        n = m
        src = dst
        if n < 3:
            return
    # The polygon's corners on screen: fixed-point X, Y (exact in float64 below 2^53) and the NDC depth
    # (exact in float64 as a working-type value) into the other half of poly.
    dst = 1 - src
    for k in range(n):
        x, y, w = poly[src, k, 0], poly[src, k, 1], poly[src, k, 2]
        corner = int(poly[src, k, 3])
        v = idx[corner] if corner >= 0 else -1
        if v >= 0 and scr[v, 3] == _VERTEX_FAST:
            X, Y, zn = np.int64(scr[v, 0]), np.int64(scr[v, 1]), scr[v, 2]
        else:
            sxd = (x / w + 1.0) * (np.float64(W) * 0.5) - 0.5
            syd = (1.0 - y / w) * (np.float64(H) * 0.5) - 0.5
            if v >= 0:
                zd = np.float64(pos_b[v, 2]) / np.float64(pos_b[v, 3])
            else:
                c0 = (lines[0, 0] * x + lines[0, 1] * y) + lines[0, 2] * w
                c1 = (lines[1, 0] * x + lines[1, 1] * y) + lines[1, 2] * w
                c2 = (lines[2, 0] * x + lines[2, 1] * y) + lines[2, 2] * w
                num = (c0 * np.float64(pos_b[i0, 2]) + c1 * np.float64(pos_b[i1, 2])) + c2 * np.float64(pos_b[i2, 2])
                den = (c0 * np.float64(pos_b[i0, 3]) + c1 * np.float64(pos_b[i1, 3])) + c2 * np.float64(pos_b[i2, 3])
                zd = num / den
            X, Y, zn = _snap(sxd), _snap(syd), _finite_depth(ft, zd)
        poly[dst, k, 0] = np.float64(X)
        poly[dst, k, 1] = np.float64(Y)
        poly[dst, k, 2] = np.float64(zn)
    f = ft.dtype.type
    for k in range(1, n - 1):
        # The grid coordinates (below 2^23 in magnitude) are exact in the working float type.
        fX0, fY0, fX1, fY1 = f(poly[dst, 0, 0]), f(poly[dst, 0, 1]), f(poly[dst, k, 0]), f(poly[dst, k, 1])
        fX2, fY2 = f(poly[dst, k + 1, 0]), f(poly[dst, k + 1, 1])
        ilo, ihi, jlo, jhi = _centre_box(ft, fX0, fY0, fX1, fY1, fX2, fY2, W, r0, r1)
        if ilo <= ihi and jlo <= jhi:
            _raster_fixed(ft, fX0, fY0, f(poly[dst, 0, 2]), fX1, fY1, f(poly[dst, k, 2]), fX2, fY2,
                          f(poly[dst, k + 1, 2]), t, W, r0, cull, zbuf, np.int64(ilo), np.int64(ihi), np.int64(jlo),
                          np.int64(jhi))


@numba.njit(cache=True, error_model="numpy")
def _raster_triangles(pos_b, scr, tri, H, W, r0, r1, cull, zbuf):
    """Step 2 for one image and the rows [r0, r1): zbuf[(i - r0) * W + j] = min(key)."""
    V = scr.shape[0]
    poly = np.empty((2, 8, 5), np.float64)
    lines = np.empty((7, 3), np.float64)
    for t in range(tri.shape[0]):
        i0, i1, i2 = tri[t, 0], tri[t, 1], tri[t, 2]
        if i0 < 0 or i0 >= V or i1 < 0 or i1 >= V or i2 < 0 or i2 >= V:
            continue
        c0, c1, c2 = scr[i0, 3], scr[i1, 3], scr[i2, 3]
        if c0 == _VERTEX_FAST and c1 == _VERTEX_FAST and c2 == _VERTEX_FAST:
            fX0, fY0, fX1, fY1, fX2, fY2 = scr[i0, 0], scr[i0, 1], scr[i1, 0], scr[i1, 1], scr[i2, 0], scr[i2, 1]
            ilo, ihi, jlo, jhi = _centre_box(scr, fX0, fY0, fX1, fY1, fX2, fY2, W, r0, r1)
            if ilo <= ihi and jlo <= jhi:
                _raster_fixed(scr, fX0, fY0, scr[i0, 2], fX1, fY1, scr[i1, 2], fX2, fY2, scr[i2, 2], t, W, r0, cull,
                              zbuf, np.int64(ilo), np.int64(ihi), np.int64(jlo), np.int64(jhi))
        elif c0 != _VERTEX_DROPPED and c1 != _VERTEX_DROPPED and c2 != _VERTEX_DROPPED:
            _raster_clipped(scr, pos_b, scr, i0, i1, i2, t, H, W, r0, r1, cull, zbuf, poly, lines)


@numba.njit(cache=True, error_model="numpy")
def _pixel_bary_exact(pos_b, v0, v1, v2, X, Y):
    """Perspective-correct (c0, c1, c2) of pixel NDC (X, Y) (float64), in float64:
    u = c0 / s, v = c1 / s with s = c0 + c1 + c2.

    _pixel_bary's formula (the one the backward pass differentiates) in float64: with float32 inputs
    the cancellation in x_k - X w_k, which in float32 moved the reprojected point of a triangle seen
    nearly edge-on by up to 2e-2 pixel, costs nothing that survives the final rounding to float32.
    """
    a0x = np.float64(pos_b[v0, 0]) - X * np.float64(pos_b[v0, 3])
    a0y = np.float64(pos_b[v0, 1]) - Y * np.float64(pos_b[v0, 3])
    a1x = np.float64(pos_b[v1, 0]) - X * np.float64(pos_b[v1, 3])
    a1y = np.float64(pos_b[v1, 1]) - Y * np.float64(pos_b[v1, 3])
    a2x = np.float64(pos_b[v2, 0]) - X * np.float64(pos_b[v2, 3])
    a2y = np.float64(pos_b[v2, 1]) - Y * np.float64(pos_b[v2, 3])
    c0 = a1x * a2y - a1y * a2x
    c1 = a2x * a0y - a2y * a0x
    c2 = a0x * a1y - a0y * a1x
    return c0, c1, c2


@numba.njit(cache=True, error_model="numpy")
def _pixel_bary(pos_b, v0, v1, v2, X, Y):
    """Perspective-correct (u, v) of pixel NDC (X, Y) and the terms the backward pass reuses.

    With a_k = (x_k - X w_k, y_k - Y w_k), the clip-space point sum b_k p_k projects onto (X, Y)
    exactly when sum b_k a_k = 0, whose solution is b_k proportional to c_0 = a_1 x a_2,
    c_1 = a_2 x a_0, c_2 = a_0 x a_1 (2-D cross products).
    """
    a0x = pos_b[v0, 0] - X * pos_b[v0, 3]
    a0y = pos_b[v0, 1] - Y * pos_b[v0, 3]
    a1x = pos_b[v1, 0] - X * pos_b[v1, 3]
    a1y = pos_b[v1, 1] - Y * pos_b[v1, 3]
    a2x = pos_b[v2, 0] - X * pos_b[v2, 3]
    a2y = pos_b[v2, 1] - Y * pos_b[v2, 3]
    c0 = a1x * a2y - a1y * a2x
    c1 = a2x * a0y - a2y * a0x
    c2 = a0x * a1y - a0y * a1x
    s = c0 + c1 + c2
    return a0x, a0y, a1x, a1y, a2x, a2y, c0, c1, s


@numba.njit(cache=True, error_model="numpy")
def _resolve_rows(pos_b, tri, zbuf, H, W, r0, r1, attr_b, tri_id_b, bary_b, depth_b, out_b):
    """Step 3 for one image and rows [r0, r1), interpolating attr_b (V, C) into out_b when C > 0."""
    V = pos_b.shape[0]
    C = attr_b.shape[1]
    zero = pos_b.dtype.type(0)
    one = pos_b.dtype.type(1)
    inv_w, inv_h = 1.0 / np.float64(W), 1.0 / np.float64(H)
    for i in range(r0, r1):
        Y = np.float64(H - 2 * i - 1) * inv_h
        for j in range(W):
            key = zbuf[(i - r0) * W + j]
            t = np.int64(key & _LOW32)
            ok = key != _ALL_ONES and t < tri.shape[0]
            if ok:
                v0, v1, v2 = tri[t, 0], tri[t, 1], tri[t, 2]
                ok = v0 >= 0 and v0 < V and v1 >= 0 and v1 < V and v2 >= 0 and v2 < V
            if not ok:
                tri_id_b[i, j] = -1
                bary_b[i, j, 0] = zero
                bary_b[i, j, 1] = zero
                depth_b[i, j] = np.inf
                for c in range(C):
                    out_b[i, j, c] = 0
                continue
            c0, c1, c2 = _pixel_bary_exact(pos_b, v0, v1, v2, np.float64(2 * j + 1 - W) * inv_w, Y)
            # u = c0 / s, v = c1 / s, and the NDC depth zc / wc of the clip point sum b_k p_k (the
            # key's depth is that of the snapped triangle): two independent divisions.
            s = (c0 + c1) + c2
            zc = (c0 * np.float64(pos_b[v0, 2]) + c1 * np.float64(pos_b[v1, 2])) + c2 * np.float64(pos_b[v2, 2])
            wc = (c0 * np.float64(pos_b[v0, 3]) + c1 * np.float64(pos_b[v1, 3])) + c2 * np.float64(pos_b[v2, 3])
            rs = 1.0 / s if s != 0 else 0.0
            u = pos_b.dtype.type(c0 * rs)
            v = pos_b.dtype.type(c1 * rs)
            tri_id_b[i, j] = t
            bary_b[i, j, 0] = u
            bary_b[i, j, 1] = v
            z = pos_b.dtype.type(zc / wc) if wc != 0 else _key_depth(key >> _SHIFT32)
            depth_b[i, j] = -one if z < -one else (one if z > one else z)  # the key's test: [-1, 1]
            w2 = (one - u) - v
            for c in range(C):
                out_b[i, j, c] = (u * attr_b[v0, c] + v * attr_b[v1, c]) + w2 * attr_b[v2, c]


@numba.njit(cache=True, parallel=True, error_model="numpy")
def rasterize_fwd(pos, tri, H, W, cull, n_bands, attr, tri_id, bary, depth, out):
    """CPU twin of the CUDA kernels rasterize_fwd + rasterize_resolve (fused per image band).

    pos (B, V, 4); tri (T, 3) int32; attr (1 or B, V, C), C may be 0; outputs tri_id (B, H, W),
    bary (B, H, W, 2), depth (B, H, W), out (B, H, W, C). Work splits over (image, band of rows);
    each unit owns a z-buffer of its rows, so it stays in cache and needs no atomics.
    """
    B, V = pos.shape[0], pos.shape[1]
    for unit in prange(B * n_bands):
        b = unit // n_bands
        band = unit % n_bands
        r0 = band * H // n_bands
        r1 = (band + 1) * H // n_bands
        scr = np.empty((V, 4), pos.dtype)
        _screen_vertices(pos[b], H, W, scr)
        zbuf = np.empty((r1 - r0) * W, np.uint64)
        zbuf[:] = _ALL_ONES
        _raster_triangles(pos[b], scr, tri, H, W, r0, r1, cull, zbuf)
        ab = attr[b] if attr.shape[0] > 1 else attr[0]
        _resolve_rows(pos[b], tri, zbuf, H, W, r0, r1, ab, tri_id[b], bary[b], depth[b], out[b])


@numba.njit(cache=True, error_model="numpy")
def _bary_grad_rows(pos_b, tri, tri_id_b, grad_bary_b, attr_b, grad_out_b, H, W, r0, r1,
                    grad_pos_b, grad_attr_b):
    """Backward of barycentrics (and, when attr_b has channels, of interpolation) over rows [r0, r1).

    When C = attr_b.shape[1] > 0 the incoming gradient is grad_out_b (H, W, C) and grad_bary is
    formed from it; otherwise it is grad_bary_b (H, W, 2). Accumulates into grad_pos_b (V, 4) and
    grad_attr_b (V, C).
    """
    V = pos_b.shape[0]
    C = attr_b.shape[1]
    zero = pos_b.dtype.type(0)
    one = pos_b.dtype.type(1)
    fw = pos_b.dtype.type(W)
    fh = pos_b.dtype.type(H)
    for i in range(r0, r1):
        Y = pos_b.dtype.type(H - 2 * i - 1) / fh
        for j in range(W):
            t = tri_id_b[i, j]
            if t < 0 or t >= tri.shape[0]:
                continue
            v0, v1, v2 = tri[t, 0], tri[t, 1], tri[t, 2]
            if v0 < 0 or v0 >= V or v1 < 0 or v1 >= V or v2 < 0 or v2 >= V:
                continue
            X = pos_b.dtype.type(2 * j + 1 - W) / fw
            a0x, a0y, a1x, a1y, a2x, a2y, c0, c1, s = _pixel_bary(pos_b, v0, v1, v2, X, Y)
            if s == 0:
                continue
            if C > 0:
                # Interpolation backward: out = u a0 + v a1 + (1-u-v) a2.
                u, v = c0 / s, c1 / s
                w2 = (one - u) - v
                gu = zero
                gv = zero
                for c in range(C):
                    g = grad_out_b[i, j, c]
                    gu += g * (attr_b[v0, c] - attr_b[v2, c])
                    gv += g * (attr_b[v1, c] - attr_b[v2, c])
                    grad_attr_b[v0, c] += u * g
                    grad_attr_b[v1, c] += v * g
                    grad_attr_b[v2, c] += w2 * g
            else:
                gu = grad_bary_b[i, j, 0]
                gv = grad_bary_b[i, j, 1]
            if gu == 0 and gv == 0:
                continue
            # b_k = c_k / s: dL/dc_k = (g_k - G) / s with G = gu u + gv v and g_2 = 0.
            G = (gu * c0 + gv * c1) / s
            d0 = (gu - G) / s
            d1 = (gv - G) / s
            d2 = -G / s
            # c0 = a1 x a2, c1 = a2 x a0, c2 = a0 x a1  ->  gradients of the a_k.
            g0x = d2 * a1y - d1 * a2y
            g0y = d1 * a2x - d2 * a1x
            g1x = d0 * a2y - d2 * a0y
            g1y = d2 * a0x - d0 * a2x
            g2x = d1 * a0y - d0 * a1y
            g2y = d0 * a1x - d1 * a0x
            # a_k = (x_k - X w_k, y_k - Y w_k); z does not enter the barycentrics.
            grad_pos_b[v0, 0] += g0x
            grad_pos_b[v0, 1] += g0y
            grad_pos_b[v0, 3] -= X * g0x + Y * g0y
            grad_pos_b[v1, 0] += g1x
            grad_pos_b[v1, 1] += g1y
            grad_pos_b[v1, 3] -= X * g1x + Y * g1y
            grad_pos_b[v2, 0] += g2x
            grad_pos_b[v2, 1] += g2y
            grad_pos_b[v2, 3] -= X * g2x + Y * g2y


@numba.njit(cache=True, parallel=True, error_model="numpy")
def rasterize_bwd(pos, tri, tri_id, grad_bary, attr, grad_out, n_bands, n_chunks, grad_pos_part, grad_attr_part):
    """CPU twin of the CUDA kernels rasterize_bwd and rasterize_interpolate_bwd.

    attr (1 or B, V, C) with C = 0 selects plain rasterize_bwd (grad_bary given), C > 0 the fused
    interpolation backward (grad_out given). Work splits over (image, band of rows) units
    u = b * n_bands + band, handed out to n_chunks threads in contiguous runs. Instead of atomics,
    every accumulator is private: grad_pos_part[u] (V, 4) per unit, and grad_attr_part[u] per unit
    for per-image attributes (attr.shape[0] > 1) or grad_attr_part[chunk] per thread for shared
    ones (a (B, V, C) buffer would cost more to zero and sum than the scatter); the caller sums.
    """
    B = pos.shape[0]
    H, W = tri_id.shape[1], tri_id.shape[2]
    n_units = B * n_bands
    for chunk in prange(n_chunks):
        for unit in range(chunk * n_units // n_chunks, (chunk + 1) * n_units // n_chunks):
            b = unit // n_bands
            band = unit % n_bands
            r0 = band * H // n_bands
            r1 = (band + 1) * H // n_bands
            ab = attr[b] if attr.shape[0] > 1 else attr[0]
            ga = grad_attr_part[unit] if attr.shape[0] > 1 else grad_attr_part[chunk]
            _bary_grad_rows(pos[b], tri, tri_id[b], grad_bary[b], ab, grad_out[b], H, W, r0, r1,
                            grad_pos_part[unit], ga)


def _n_bands(B, H):
    """Row bands per image so that small batches still use every CPU thread."""
    n_threads = numba.get_num_threads()
    return 1 if B >= n_threads else max(1, min(H, -(-n_threads // B)))


# --------------------------------------------------------------------------------------------------
# Input checks and dispatch.
# --------------------------------------------------------------------------------------------------

_ArrayMeta = collections.namedtuple("_ArrayMeta", "dtype shape")


@functools.lru_cache(maxsize=512)
def _check_meta(name, dtype, shape, dtypes, patterns):
    return _checks.check_array(name, _ArrayMeta(dtype, shape), dtypes, *patterns)


def _check_array(name, a, dtypes, *patterns):
    """`_checks.check_array`, memoised on (name, dtype, shape, patterns): its verdict depends on
    nothing else, and formatting its messages costs microseconds that the batch-of-one GPU path
    cannot spare. Failures are not cached (lru_cache does not keep exceptions)."""
    dtype, shape = getattr(a, "dtype", None), getattr(a, "shape", None)
    if dtype is None or shape is None:
        return _checks.check_array(name, a, dtypes, *patterns)  # raises the TypeError
    dtypes = tuple(dtypes) if isinstance(dtypes, (tuple, list)) else (dtypes,)
    return _check_meta(name, dtype, tuple(shape), dtypes, patterns)


def _check_pos_tri(pos, tri, xp):
    on_gpu = xp is not np
    dtypes = (np.float32,) if on_gpu else (np.float32, np.float64)
    try:
        batched = _check_array("pos", pos, dtypes, ("B", "V", 4), ("V", 4)) == 0
    except TypeError as err:
        if on_gpu and getattr(pos, "dtype", None) == np.float64:
            raise TypeError(f"{err} (the GPU path takes float32 only; float64 is for CPU gradient checks)") from None
        raise
    _check_array("tri", tri, np.int32, ("T", 3))
    _checks.check_finite("pos", pos)
    _checks.check_indices("tri", tri, pos.shape[-2])
    return batched


def _check_raster(raster, B, dtype, name="raster"):
    """Checks a Raster's arrays (their module was checked by the caller's array_module); returns (H, W)."""
    if not isinstance(raster, Raster):
        raise TypeError(f"{name} must be a Raster (the result of rasterize); got {type(raster).__name__}")
    _check_array(f"{name}.tri_id", raster.tri_id, np.int32, ("B", "H", "W"))
    H, W = raster.tri_id.shape[1:]
    n = raster.tri_id.shape[0]
    _check_array(f"{name}.bary", raster.bary, dtype, (n, H, W, 2))
    if B is not None and n != B:
        raise ValueError(f"batch sizes differ: {name} has {n} images, pos has {B}")
    return H, W


def _check_tri_id_range(raster, n_tri, name="raster"):
    if not _checks.value_checks_enabled():
        return
    if _checks.queue_on_device(raster.tri_id, -1, n_tri - 1,
                               "{}.tri_id {} holds triangle ids outside [-1, {}] for the {} triangles of tri",
                               name, raster.tri_id.shape, n_tri - 1, n_tri):
        return
    lo, hi = int(raster.tri_id.min()), int(raster.tri_id.max())
    if lo < -1 or hi >= n_tri:
        raise ValueError(f"{name}.tri_id holds triangle ids in [{lo}, {hi}], outside [-1, {n_tri - 1}] "
                         f"for the {n_tri} triangles of tri")


def _check_attr(attr, B, V, dtype_of, xp):
    on_gpu = xp is not np
    dtypes = (np.float32,) if on_gpu else (np.float32, np.float64)
    batched = _check_array("attr", attr, dtypes, ("B", "V", "C"), ("V", "C")) == 0
    if attr.dtype != dtype_of:
        raise TypeError(f"attr must have the dtype of the positions/barycentrics ({dtype_of}); got {_checks.describe(attr)}")
    if attr.shape[-2] != V:
        raise ValueError(f"attr must have one row per vertex ({V}); got {_checks.describe(attr)}")
    if batched and attr.shape[0] != B:
        raise ValueError(f"batch sizes differ: attr has {attr.shape[0]}, the raster has {B}")
    _checks.check_finite("attr", attr)
    return batched


# --------------------------------------------------------------------------------------------------
# GPU path: kernels/rasterize.cu through cupy. Kernel handles are cached per device so that a call
# costs a handful of microseconds of Python.
# --------------------------------------------------------------------------------------------------

_GPU_CHANNELS = (1, 2, 3, 4)
_GPU_NAMES = (
    ["rasterize_fwd", "rasterize_setup", "rasterize_fwd_screen", "rasterize_bwd", "float4_to_float3"]
    + [f"rasterize_resolve<{c}>" for c in (0, -1) + _GPU_CHANNELS]
    + [f"rasterize_interpolate_bwd<{c}>" for c in (-1,) + _GPU_CHANNELS]
)


# --fmad=false: no fused multiply-adds, so the GPU's float32 arithmetic is the Numba twin's
# and the keys and barycentrics agree bit for bit.
_gpu_kernel = KernelFile("rasterize.cu", _GPU_NAMES, ("--fmad=false",))


def _template_channels(C):
    return C if C in _GPU_CHANNELS else -1


def _grid_2d(n, B, block=256, images_per_thread=1):
    """(grid, block) of the kernels' 2-D launch: x covers n items of one image, y the images
    (at most 65535, or B / images_per_thread; the kernels loop past it)."""
    return ((n + block - 1) // block, min(-(-B // images_per_thread), 65535)), (block,)


# Launch shape of rasterize_fwd (threads per block, images per thread), and whether the vertex
# setup runs as its own pass (rasterize_setup + rasterize_fwd_screen). Any values give the same
# keys; bench/profile_rasterize.py times the alternatives.
# H200, GPU run 5 (B = 64, 224x224, the watertight pass): 256 threads and 4 images a thread 122.4 us
# against 131.2 at 128 and 1 (each thread's triangle indices are loaded once for its 4 images).
_FWD_BLOCK = 256
_FWD_IMAGES_PER_THREAD = 4
_FWD_PREPASS = False


def _rasterize_gpu(pos, tri, B, V, H, W, cull, attr):
    import cupy  # noqa: PLC0415

    T = tri.shape[0]
    # The 64-bit keys live in the bary output (8 bytes a pixel too): the resolve reads a pixel's key,
    # then overwrites it with the pixel's barycentrics, so a call allocates only its outputs.
    bary = cupy.empty((B, H, W, 2), dtype=cupy.float32)
    zbuf = bary
    cupy.cuda.runtime.memsetAsync(zbuf.data.ptr, 0xFF, zbuf.nbytes, cupy.cuda.get_current_stream().ptr)
    b, v, t, h, w = np.int32(B), np.int32(V), np.int32(T), np.int32(H), np.int32(W)
    grid, block = _grid_2d(T, B, _FWD_BLOCK, _FWD_IMAGES_PER_THREAD)
    if _FWD_PREPASS:
        scr = cupy.empty((B, V, 4), dtype=cupy.float32)
        _gpu_kernel("rasterize_setup")(*_grid_2d(V, B, _FWD_BLOCK, _FWD_IMAGES_PER_THREAD), (pos, b, v, h, w, scr))
        _gpu_kernel("rasterize_fwd_screen")(grid, block, (scr, tri, b, v, t, h, w, np.int32(bool(cull)), zbuf, pos))
    else:
        _gpu_kernel("rasterize_fwd")(grid, block, (pos, tri, b, v, t, h, w, np.int32(bool(cull)), zbuf))
    tri_id = cupy.empty((B, H, W), dtype=cupy.int32)
    depth = cupy.empty((B, H, W), dtype=cupy.float32)
    if attr is None:
        C, attr_batched, out, name = 0, 0, None, "rasterize_resolve<0>"
    else:
        C = attr.shape[-1]
        attr_batched = int(attr.ndim == 3)
        out = cupy.empty((B, H, W, C), dtype=cupy.float32)
        name = f"rasterize_resolve<{_template_channels(C)}>"
    grid, block = _grid_2d(H * W, B)
    # With C == 0 the kernel touches neither attr nor out: any pointer will do.
    _gpu_kernel(name)(grid, block, (pos, tri, zbuf, b, v, t, h, w, np.float64(1.0 / W), np.float64(1.0 / H),
                                    zbuf if attr is None else attr, np.int32(C), np.int32(attr_batched), tri_id, bary,
                                    depth, depth if out is None else out))
    return Raster(tri_id, bary, depth), out


def _as_gpu_input(a, xp):
    """a itself when C-contiguous and 16-byte aligned (float4 loads need it), else an aligned copy."""
    if not a.flags.c_contiguous:
        return xp.ascontiguousarray(a)  # a fresh allocation: cupy's pool aligns to 256 bytes
    return a if a.data.ptr % 16 == 0 else a.copy()


# --------------------------------------------------------------------------------------------------
# Public ops.
# --------------------------------------------------------------------------------------------------

def rasterize(pos, tri, resolution, cull_backfaces=False):
    """Finds the nearest triangle at every pixel centre, with perspective-correct barycentrics.

    Args:
        pos: (B, V, 4) or (V, 4) float32 clip-space positions, numpy or cupy (float64 accepted on
            the CPU, for gradient checks; then bary and depth are float64).
        tri: (T, 3) int32 vertex indices; counter-clockwise seen from the camera is front-facing.
        resolution: (H, W).
        cull_backfaces: drop triangles that are clockwise on screen.

    Returns:
        Raster with tri_id (B, H, W) int32 (-1 empty), bary (B, H, W, 2), depth (B, H, W) NDC z
        (+inf empty); B = 1 for (V, 4) positions. Ties: the smaller depth wins (+0 and -0 are
        equal), then the lower triangle id; a centre on a shared edge or vertex of a closed mesh is
        covered exactly once (exact edge functions on a 1/256-pixel grid, top-left rule; see the
        module docstring).

    Near plane and camera plane: fragments whose NDC z lies outside [-1, 1] are dropped one by one
    (z = -w, exactly on the near plane, is kept; z < -w, in front of it, is not). A triangle with a
    vertex at w <= 0 (on or behind the camera plane) is dropped whole: there is no clipping at the
    camera plane. Every other triangle is drawn whatever its size: one with a vertex more than
    8192 pixels off screen (huge coordinates, or w just above 0) is clipped against that guard band
    in float64 rather than dropped or drawn wrong.
    """
    raster, _ = _rasterize(pos, tri, resolution, cull_backfaces, None)
    return raster


def rasterize_interpolate(pos, tri, resolution, attr, cull_backfaces=False):
    """`rasterize` followed by `interpolate(attr, raster, tri)`, fused into one pass per pixel.

    Args:
        pos, tri, resolution, cull_backfaces: as for `rasterize`.
        attr: (V, C) or (B, V, C) per-vertex attributes, the dtype of pos.

    Returns:
        (raster, out): the Raster and the (B, H, W, C) interpolated attributes, zeros where empty;
        the same numbers as the two calls.
    """
    return _rasterize(pos, tri, resolution, cull_backfaces, attr)


def _rasterize(pos, tri, resolution, cull_backfaces, attr):
    if not isinstance(cull_backfaces, (bool, np.bool_)):
        raise TypeError(f"cull_backfaces must be True or False; got {cull_backfaces!r}")
    xp = array_module(("pos", pos), ("tri", tri), ("attr", attr))
    H, W = _checks.check_resolution("resolution", resolution)
    batched = _check_pos_tri(pos, tri, xp)
    B = pos.shape[0] if batched else 1
    V = pos.shape[-2]
    if attr is not None:
        _check_attr(attr, B, V, pos.dtype, xp)
    if xp is not np:
        # No (1, V, 4) view for unbatched positions: the kernels only need B, and a cupy view
        # costs microseconds on the batch-of-one path.
        attr_g = None if attr is None else _as_gpu_input(attr, xp)
        return _rasterize_gpu(_as_gpu_input(pos, xp), _as_gpu_input(tri, xp), B, V, H, W, cull_backfaces, attr_g)
    pos3 = np.ascontiguousarray(pos if batched else pos[None])
    tri = np.ascontiguousarray(tri)
    if attr is None:
        attr3 = np.zeros((1, V, 0), pos.dtype)
    else:
        attr3 = np.ascontiguousarray(attr if attr.ndim == 3 else attr[None])
    C = attr3.shape[2]
    tri_id = np.empty((B, H, W), np.int32)
    bary = np.empty((B, H, W, 2), pos.dtype)
    depth = np.empty((B, H, W), pos.dtype)
    out = np.empty((B, H, W, C), pos.dtype)
    rasterize_fwd(pos3, tri, H, W, bool(cull_backfaces), _n_bands(B, H), attr3, tri_id, bary, depth, out)
    return Raster(tri_id, bary, depth), (out if attr is not None else None)


def rasterize_backward(pos, tri, raster, grad_bary):
    """Gradient of the barycentrics with respect to the clip positions, the triangles held fixed.

    Args:
        pos: (B, V, 4) or (V, 4), as given to `rasterize`.
        tri: (T, 3) int32, as given to `rasterize`.
        raster: the Raster that `rasterize(pos, tri, ...)` returned (only tri_id is read: the
            barycentrics are recomputed from pos in the same arithmetic).
        grad_bary: (B, H, W, 2), the gradient of a loss with respect to raster.bary.

    Returns:
        grad_pos shaped like pos: sum over covered pixels of d(u, v)/d(x, y, w) of the pixel's
        three vertices times grad_bary; the z column is zero (barycentrics do not depend on z).
    """
    xp = array_module(("pos", pos), ("tri", tri), ("grad_bary", grad_bary),
                      ("raster.tri_id", getattr(raster, "tri_id", None)), ("raster.bary", getattr(raster, "bary", None)))
    batched = _check_pos_tri(pos, tri, xp)
    pos3 = pos if batched else pos[None]
    B, V = pos3.shape[0], pos3.shape[1]
    H, W = _check_raster(raster, B, pos.dtype)
    _check_array("grad_bary", grad_bary, pos.dtype, (B, H, W, 2))
    _checks.check_finite("grad_bary", grad_bary)
    _check_tri_id_range(raster, tri.shape[0])
    if xp is not np:
        grad_pos = _rasterize_backward_gpu(pos3, tri, raster, grad_bary, None, None)[0]
    else:
        grad_pos, _ = _rasterize_backward_cpu(pos3, tri, raster, grad_bary, None, None)
    return grad_pos if batched else grad_pos[0]


def rasterize_interpolate_backward(pos, tri, attr, raster, grad_out):
    """Backward of `rasterize_interpolate`: gradients of the interpolated image to pos and attr.

    Args:
        pos, tri, attr: as given to `rasterize_interpolate`.
        raster: the Raster it returned.
        grad_out: (B, H, W, C), the gradient of a loss with respect to the interpolated image.

    Returns:
        (grad_pos, grad_attr) shaped like pos and attr (grad_attr summed over the batch when attr
        is (V, C)); equal to interpolate_backward followed by rasterize_backward.
    """
    xp = array_module(("pos", pos), ("tri", tri), ("attr", attr), ("grad_out", grad_out),
                      ("raster.tri_id", getattr(raster, "tri_id", None)), ("raster.bary", getattr(raster, "bary", None)))
    batched = _check_pos_tri(pos, tri, xp)
    pos3 = pos if batched else pos[None]
    B, V = pos3.shape[0], pos3.shape[1]
    H, W = _check_raster(raster, B, pos.dtype)
    _check_attr(attr, B, V, pos.dtype, xp)
    C = attr.shape[-1]
    _check_array("grad_out", grad_out, pos.dtype, (B, H, W, C))
    _checks.check_finite("grad_out", grad_out)
    _check_tri_id_range(raster, tri.shape[0])
    if xp is not np:
        grad_pos, grad_attr = _rasterize_backward_gpu(pos3, tri, raster, None, attr, grad_out)
    else:
        grad_pos, grad_attr = _rasterize_backward_cpu(pos3, tri, raster, None, attr, grad_out)
    return (grad_pos if batched else grad_pos[0]), grad_attr


def _rasterize_backward_cpu(pos3, tri, raster, grad_bary, attr, grad_out):
    B, V = pos3.shape[0], pos3.shape[1]
    H, W = raster.tri_id.shape[1:]
    dtype = pos3.dtype
    n_bands = _n_bands(B, H)
    if attr is None:
        attr3 = np.zeros((1, V, 0), dtype)
        grad_out = np.zeros((B, 1, 1, 0), dtype)
        grad_bary = np.ascontiguousarray(grad_bary)
    else:
        attr3 = np.ascontiguousarray(attr if attr.ndim == 3 else attr[None])
        grad_bary = np.zeros((B, 1, 1, 2), dtype)
        grad_out = np.ascontiguousarray(grad_out)
    C = attr3.shape[2]
    n_units = B * n_bands
    n_chunks = min(numba.get_num_threads(), n_units)
    per_image_attr = attr3.shape[0] > 1
    grad_pos_part = np.zeros((n_units, V, 4), dtype)
    grad_attr_part = np.zeros((n_units if per_image_attr else n_chunks, V, C), dtype)
    rasterize_bwd(np.ascontiguousarray(pos3), np.ascontiguousarray(tri), np.ascontiguousarray(raster.tri_id),
                  grad_bary, attr3, grad_out, n_bands, n_chunks, grad_pos_part, grad_attr_part)
    grad_pos = grad_pos_part.reshape(B, n_bands, V, 4).sum(1) if n_bands > 1 else grad_pos_part
    if attr is None:
        return grad_pos, None
    if per_image_attr:
        grad_attr = grad_attr_part.reshape(B, n_bands, V, C).sum(1) if n_bands > 1 else grad_attr_part
    else:
        grad_attr = grad_attr_part.sum(0).reshape(attr.shape)
    return grad_pos, grad_attr


def _rasterize_backward_gpu(pos3, tri, raster, grad_bary, attr, grad_out):
    import cupy  # noqa: PLC0415

    pos3 = _as_gpu_input(pos3, cupy)
    tri = _as_gpu_input(tri, cupy)
    B, V = pos3.shape[0], pos3.shape[1]
    T = tri.shape[0]
    H, W = raster.tri_id.shape[1:]
    tri_id = cupy.ascontiguousarray(raster.tri_id)
    grad_pos = cupy.zeros((B, V, 4), dtype=cupy.float32)
    grid, block = _grid_2d(H * W, B)
    dims = (np.int32(B), np.int32(V), np.int32(T), np.int32(H), np.int32(W))
    if attr is None:
        grad_bary = _as_gpu_input(grad_bary, cupy)
        _gpu_kernel("rasterize_bwd")(grid, block, (pos3, tri, tri_id, grad_bary) + dims + (grad_pos,))
        return grad_pos, None
    attr = _as_gpu_input(attr, cupy)
    grad_out = _as_gpu_input(grad_out, cupy)
    C = attr.shape[-1]
    # 3 or 4 channels accumulate in a (..., V, 4) buffer, one float4 atomic per vertex and pixel
    # (kernels/rasterize.cu, attr_grad_float4); 3 channels are then copied out of it.
    grad_attr = cupy.zeros(attr.shape[:-1] + (4,) if C in (3, 4) else attr.shape, dtype=cupy.float32)
    name = f"rasterize_interpolate_bwd<{_template_channels(C)}>"
    _gpu_kernel(name)(grid, block, (pos3, tri, attr, tri_id, grad_out) + dims
                      + (np.int32(C), np.int32(attr.ndim == 3), grad_pos, grad_attr))
    if C == 3:
        grad_attr = _float4_to_float3(grad_attr, attr.shape)
    return grad_pos, grad_attr


def _float4_to_float3(acc, shape):
    """The first 3 columns of a (..., 4) float32 cupy array, as a new C-contiguous array of `shape`."""
    import cupy  # noqa: PLC0415

    out = cupy.empty(shape, dtype=cupy.float32)
    n = acc.size // 4
    if n == 0:
        return out
    _gpu_kernel("float4_to_float3")(((n + 255) // 256,), (256,), (acc, np.int32(n), out))
    return out
