"""Analytic antialiasing of silhouette edges, and its backward pass (Laine et al. 2020, "Modular
primitives for high-performance differentiable rendering", the `antialias` op of nvdiffrast).

A rasterized image samples coverage at pixel centres, so it is a step function of the geometry and
the silhouette pulls on nothing in `rasterize_backward`. This op blends colours across the silhouette
by where it crosses between pixel centres, which makes the image a continuous function of the
positions of the silhouette edges' vertices, with gradients.

The algorithm, the same on both backends (CUDA twin: kernels/antialias.cu):

1. Silhouette edges. Edge k of triangle t (the edge opposite corner k: v1-v2, v2-v0, v0-v1) is a
   silhouette edge when t is drawable (every w > 0), its corner k is off the edge's line, and the
   surface does not go on across the edge: no other triangle shares it, the neighbour's far vertex
   has w <= 0 (the neighbour is not drawn), or that vertex lies on t's side of the line or on it (the
   surface folds over the edge, so one of the two faces away). The side is the sign of e(P) below at
   the far vertex against its sign at corner k, the same line for both triangles of the edge (negated
   exactly), so the test does not depend on how either runs along it. An edge between two triangles
   that both face the camera (or both away) is not a silhouette: it is inside the surface, and
   blending there would blur the image. With more than two triangles on an edge, the lowest-numbered
   other triangle decides. The far vertices come from `antialias_topology(tri)` (once per mesh).
   `silhouette_pixels(raster, pos, tri)` gives each pixel the silhouette bits of its triangle (one
   thread per pixel on the GPU): the pixel passes read those coalesced instead of looking up both
   triangles of every pair in a per-triangle table (up to eight random reads a pixel per pass, the
   triangles of a face mesh being smaller than a pixel). The ops find them themselves unless given
   them, and a forward and backward on the same raster share one result. `silhouette_edges(pos, tri)`
   gives the per-triangle bits.
2. Pixel pairs: every horizontally or vertically adjacent pair of pixels (p0 the left or upper one)
   whose triangle ids differ. The front triangle is the one of the pixel with the smaller depth (an
   empty pixel never is; equal depths: the lower id). Its edge through which the segment from the
   front pixel's centre to the other centre leaves it (the first crossing, lowest edge on ties) is
   found in clip space: with a' = (x, y, w) of the edge's vertices, e(P) = (a' x b') . (X, Y, 1) is
   the edge's line at NDC point (X, Y), exact under perspective without a division, and the segment
   crosses it at f = e_front / (e_front - e_other) in [0, 1) (in units of the pixel spacing, from the
   front centre). If that edge is a silhouette edge, one pixel of the pair is blended: the other
   pixel when f > 1/2 (the front surface reaches past the midpoint into it), by a = f - 1/2 toward
   the front colour; the front pixel when f < 1/2 (its surface stops short of its half), by
   a = 1/2 - f toward the other colour; f = 1/2 blends nothing. out[dst] += a (color[src] -
   color[dst]), with the colours as given (blends do not compound).
3. Each output pixel adds its own blends from its four pairs in the order left, right, up, down. On
   the GPU a thread per pixel evaluates its four pairs (each pair twice, once by each pixel, with the
   same arithmetic, so the same answer): no atomics. On the CPU each pair is evaluated once, in an
   order that adds every pixel's blends in that same order. Both are deterministic, and the GPU's
   float32 arithmetic is the Numba twin's (--fmad=false): the same numbers bit for bit.

Backward: out[dst] = (1 - a) color[dst] + a color[src] gives grad_color by the same gather. With
g_a = sum_c grad_out[dst, c] (color[src, c] - color[dst, c]) and da/df = +1 (f > 1/2) or -1,
dL/de_front = dL/df (-e_other) / D^2 and dL/de_other = dL/df e_front / D^2 (D = e_front - e_other);
as e(P) = det(a', b', P), de/da' = b' x P and de/db' = P x a', so with Q = dL/de_front P_front +
dL/de_other P_other, grad a' = b' x Q and grad b' = Q x a' (the x, y, w columns of pos; z is 0). Each
pair's position gradient is scattered once (on the GPU by its left or upper pixel, with atomics; on
the CPU into private buffers per (image, band of rows)).

Speed: the small helpers are inlined into the kernels (`inline="always"`): called per pixel pair, Numba
passes their array arguments with reference counting, which made the CPU forward 15x slower. On the
CPU the per-pixel masks cost more than per-triangle ones did (5.4 against 3.5 ms, batch 8, 224x224,
one thread: a row of pixels reads its triangles out of order) and the pixel passes as much less (4.4
against 5.7 ms); on the GPU they replace two per-triangle passes and the random reads of both.

What it does not do (as nvdiffrast): edges crossing the segment between two pixels that both show
the same triangle, and a silhouette of a triangle that covers no pixel centre, are not seen; the
blend is one-dimensional per pair, not the pixel's area coverage.
"""
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

from fastface import _checks
from fastface._backend import KernelFile, array_module
# The rasterizer's helpers: row bands of the CPU passes, the GPU's 2-D grid and its float4-ready inputs.
from fastface.ops.rasterize import Raster, _as_gpu_input, _grid_2d, _n_bands

__all__ = ["AntialiasTopology", "antialias_topology", "antialias", "antialias_backward", "silhouette_edges",
           "silhouette_pixels"]


@dataclass(frozen=True)
class AntialiasTopology:
    """Edge -> far vertex topology of a mesh, for `antialias`; build it with `antialias_topology`.

    Attributes:
        opposite: (T, 3) int32 on the device of the mesh's triangles: for edge k of triangle t (the edge
            opposite corner k), the vertex of the triangle across it that is not on the edge (the
            lowest-numbered such triangle when several share the edge), or -1 when no other triangle
            has that edge.
        n_triangles: T of the triangle array it was built from.
    """
    opposite: object
    n_triangles: int


def antialias_topology(tri):
    """Finds, for every triangle edge, the far vertex of the triangle on the other side (once per mesh).

    Built on the host with a sort of the 3T edges (tens of milliseconds for the default face model's
    70k triangles). For a cupy `tri` the triangles are copied to the host and the result back: a
    one-time, synchronising setup. Build it once per mesh and pass it to `antialias` and
    `antialias_backward` (the fast path).

    Args:
        tri: (T, 3) int32 triangle vertex indices, numpy or cupy.

    Returns:
        `AntialiasTopology` on the device of `tri`. An edge shared by more than two triangles gets the
        lowest-numbered other one.
    """
    xp = array_module(("tri", tri))
    _checks.check_array("tri", tri, np.int32, ("T", 3))
    host = np.ascontiguousarray(tri.get() if xp is not np else tri)
    n = host.shape[0]
    a = host[:, [1, 2, 0]].reshape(-1).astype(np.int64)  # edge k of t (entry 3t + k) runs from a to b
    b = host[:, [2, 0, 1]].reshape(-1).astype(np.int64)
    shift = -min(int(host.min()), 0)  # keys stay non-negative for any int32 indices
    span = int(host.max()) + shift + 1
    key = (np.minimum(a, b) + shift) * span + (np.maximum(a, b) + shift)
    order = np.argsort(key, kind="stable")  # entries of one edge: consecutive, in triangle order
    sorted_key = key[order]
    start = np.searchsorted(sorted_key, sorted_key, side="left")
    end = np.searchsorted(sorted_key, sorted_key, side="right")
    rank = np.arange(3 * n)
    other = np.where(rank == start, start + 1, start)  # the first entry of the edge that is not this one
    found = other < end
    entry, across = order[found], order[other[found]]
    opposite = np.full(3 * n, -1, np.int64)
    opposite[entry] = host.reshape(-1)[across]  # entry 3s + k of the other triangle s: its corner k, off the edge
    opposite = opposite.astype(np.int32).reshape(n, 3)
    return AntialiasTopology(opposite=xp.asarray(opposite) if xp is not np else opposite, n_triangles=n)


# --------------------------------------------------------------------------------------------------
# Numba twins of kernels/antialias.cu. Float expressions are written in the same order as there, and
# constants are made in the working float type (float32 on the hot path, float64 for gradient checks).
# --------------------------------------------------------------------------------------------------

_NEXT = (1, 2, 0)  # edge k of a triangle joins corners _NEXT[k] and _PREV[k]; it is opposite corner k
_PREV = (2, 0, 1)


@numba.njit(cache=True, error_model="numpy", inline="always")
def _edge_line(pos_b, va, vb):
    """(Lx, Ly, Lw) = a' x b' with a' = (x, y, w) of vertex va: the edge's line, L . (X, Y, 1) = 0."""
    xa, ya, wa = pos_b[va, 0], pos_b[va, 1], pos_b[va, 3]
    xb, yb, wb = pos_b[vb, 0], pos_b[vb, 1], pos_b[vb, 3]
    return ya * wb - wa * yb, wa * xb - xa * wb, xa * yb - ya * xb


@numba.njit(cache=True, error_model="numpy", inline="always")
def _line_at_vertex(lx, ly, lw, pos_b, v):
    return (lx * pos_b[v, 0] + ly * pos_b[v, 1]) + lw * pos_b[v, 3]


@numba.njit(cache=True, error_model="numpy", inline="always")
def _silhouette_bits(pos_b, tri, opposite, t):
    """Twin of the CUDA silhouette_bits (with load_triangle's range test): bit k when edge k of triangle t
    is a silhouette edge in this image (module docstring, step 1); 0 for indices out of range."""
    V = pos_b.shape[0]
    zero = pos_b.dtype.type(0)
    for k in range(3):
        if tri[t, k] < 0 or tri[t, k] >= V:
            return 0
    if not (pos_b[tri[t, 0], 3] > zero and pos_b[tri[t, 1], 3] > zero and pos_b[tri[t, 2], 3] > zero):
        return 0
    mask = 0
    for k in range(3):
        lx, ly, lw = _edge_line(pos_b, tri[t, _NEXT[k]], tri[t, _PREV[k]])
        ec = _line_at_vertex(lx, ly, lw, pos_b, tri[t, k])
        if ec == zero:
            continue
        folds = True
        d = opposite[t, k]
        if d >= 0 and d < V and pos_b[d, 3] > zero:
            eo = _line_at_vertex(lx, ly, lw, pos_b, d)
            folds = not (eo < zero) if ec > zero else not (eo > zero)
        if folds:
            mask |= 1 << k
    return mask


@numba.njit(cache=True, parallel=True, error_model="numpy")
def silhouette_masks(pos, tri, opposite, sil):
    """CPU twin of antialias_silhouettes, in parallel over the images: pos (NB, V, 4), tri and opposite
    (T, 3) -> sil (NB, T) uint8."""
    for b in prange(sil.shape[0]):
        for t in range(tri.shape[0]):
            sil[b, t] = _silhouette_bits(pos[b], tri, opposite, t)


@numba.njit(cache=True, parallel=True, error_model="numpy")
def silhouette_pixel_masks(pos, tri, opposite, tri_id, n_bands, psil):
    """CPU twin of antialias_silhouette_pixels, per (image, band of rows): pos (1 or B, V, 4), tri and
    opposite (T, 3), tri_id (B, H, W) -> psil (B, H, W) uint8, 0 where the pixel is empty."""
    B, H, W = tri_id.shape
    T = tri.shape[0]
    for unit in prange(B * n_bands):
        b = unit // n_bands
        band = unit % n_bands
        pos_b = pos[b if pos.shape[0] > 1 else 0]
        for i in range(band * H // n_bands, (band + 1) * H // n_bands):
            for j in range(W):
                t = tri_id[b, i, j]
                psil[b, i, j] = _silhouette_bits(pos_b, tri, opposite, t) if t >= 0 and t < T else 0


@numba.njit(cache=True, error_model="numpy", inline="always")
def _pair(pos_b, tri, psil_b, tri_id_b, depth_b, H, W, i0, j0, i1, j1):
    """The blend of the pixel pair p0 = (i0, j0), p1 = (i1, j1) (p0 left of or above p1).

    Returns (dst, a, sign, va, vb, ef, eo, Xf, Yf, Xo, Yo): dst -1 (no blend), 0 (p0 is blended) or 1
    (p1); a the blend weight; sign = da/df; the silhouette edge's vertices; the edge function at the
    front and the other centre and those centres in NDC.
    """
    F = pos_b.dtype.type
    zero = F(0)
    half = F(0.5)
    V = pos_b.shape[0]
    nothing = (-1, zero, zero, 0, 0, zero, zero, zero, zero, zero, zero)
    # The front triangle is one of the two: when neither pixel's triangle has a silhouette edge (most
    # pairs of a dense mesh), nothing more is read.
    m0 = psil_b[i0, j0]
    m1 = psil_b[i1, j1]
    if m0 == 0 and m1 == 0:
        return nothing
    t0 = tri_id_b[i0, j0]
    t1 = tri_id_b[i1, j1]
    if t0 == t1:
        return nothing
    if t1 < 0:
        front1 = False
    elif t0 < 0:
        front1 = True
    else:
        d0 = depth_b[i0, j0]
        d1 = depth_b[i1, j1]
        front1 = d1 < d0 or (d1 == d0 and t1 < t0)
    t = t1 if front1 else t0
    mask = m1 if front1 else m0
    if mask == 0:
        return nothing
    if front1:
        Xf = F(2 * j1 + 1 - W) / F(W)
        Yf = F(H - 2 * i1 - 1) / F(H)
        Xo = F(2 * j0 + 1 - W) / F(W)
        Yo = F(H - 2 * i0 - 1) / F(H)
    else:
        Xf = F(2 * j0 + 1 - W) / F(W)
        Yf = F(H - 2 * i0 - 1) / F(H)
        Xo = F(2 * j1 + 1 - W) / F(W)
        Yo = F(H - 2 * i1 - 1) / F(H)
    best = -1
    best_f = zero
    best_ef = zero
    best_eo = zero
    for k in range(3):
        va = tri[t, _NEXT[k]]
        vb = tri[t, _PREV[k]]
        vc = tri[t, k]
        if va < 0 or va >= V or vb < 0 or vb >= V or vc < 0 or vc >= V:
            return nothing
        lx, ly, lw = _edge_line(pos_b, va, vb)
        ec = _line_at_vertex(lx, ly, lw, pos_b, vc)
        ef = (lx * Xf + ly * Yf) + lw
        eo = (lx * Xo + ly * Yo) + lw
        # Inside is where e has the sign of e at the third vertex (all w > 0 for a drawn triangle).
        crosses = (ef >= zero and eo < zero) if ec > zero else (ef <= zero and eo > zero)
        if ec == zero or not crosses:
            continue
        f = ef / (ef - eo)
        if best < 0 or f < best_f:
            best, best_f, best_ef, best_eo = k, f, ef, eo
    if best < 0 or (mask >> best) & 1 == 0:
        return nothing
    va = tri[t, _NEXT[best]]
    vb = tri[t, _PREV[best]]
    if best_f >= half:
        a, sign = best_f - half, F(1)
        dst = 0 if front1 else 1
    else:
        a, sign = half - best_f, F(-1)
        dst = 1 if front1 else 0
    return dst, a, sign, va, vb, best_ef, best_eo, Xf, Yf, Xo, Yo


@numba.njit(cache=True, error_model="numpy", inline="always")
def _blend_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, b, i0, j0, i1, j1, r0, r1, out):
    """Adds pair (p0, p1)'s blend to out[b] when its blended pixel lies in the rows [r0, r1)."""
    H, W, C = color.shape[1], color.shape[2], color.shape[3]
    dst, a, _, _, _, _, _, _, _, _, _ = _pair(pos_b, tri, psil_b, tri_id_b, depth_b, H, W, i0, j0, i1, j1)
    if dst < 0:
        return
    di, dj, si, sj = (i0, j0, i1, j1) if dst == 0 else (i1, j1, i0, j0)
    if di < r0 or di >= r1:
        return
    for c in range(C):
        out[b, di, dj, c] += a * (color[b, si, sj, c] - color[b, di, dj, c])


@numba.njit(cache=True, parallel=True, error_model="numpy")
def antialias_fwd(color, tri_id, depth, pos, tri, psil, n_bands, out):
    """CPU twin of the CUDA kernel antialias_fwd, per (image, band of rows): color (B, H, W, C), tri_id
    and depth (B, H, W), pos (1 or B, V, 4), tri (T, 3), psil (B, H, W) uint8 from silhouette_pixel_masks
    -> out (B, H, W, C).

    Unlike the GPU's gather (each pixel evaluates its four pairs), each pair is evaluated once, in an order that
    adds every pixel's blends in the gather's order (left, right, up, down), so the sums round alike:
    row i's horizontal pairs, then the vertical pairs between rows i - 1 and i. A pair across a band's
    edge is evaluated by both bands, each adding only to its own row.
    """
    B, H, W, C = color.shape
    for unit in prange(B * n_bands):
        b = unit // n_bands
        band = unit % n_bands
        r0 = band * H // n_bands
        r1 = (band + 1) * H // n_bands
        pb = b if pos.shape[0] > 1 else 0
        pos_b = pos[pb]
        psil_b = psil[b]
        tri_id_b = tri_id[b]
        depth_b = depth[b]
        for i in range(r0, r1):
            for j in range(W):
                for c in range(C):
                    out[b, i, j, c] = color[b, i, j, c]
            for j in range(W - 1):
                _blend_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, b, i, j, i, j + 1, r0, r1, out)
            if i > 0:
                for j in range(W):
                    _blend_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, b, i - 1, j, i, j, r0, r1, out)
        if r1 < H:
            for j in range(W):
                _blend_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, b, r1 - 1, j, r1, j, r0, r1, out)


@numba.njit(cache=True, error_model="numpy", inline="always")
def _scatter_edge_grad(pos_b, va, vb, gt, ef, eo, Xf, Yf, Xo, Yo, grad_pos_b):
    """dL/df = gt -> the x, y, w gradients of the edge's vertices (see the module docstring)."""
    one = pos_b.dtype.type(1)
    den = ef - eo
    den2 = den * den
    gef = gt * (-eo) / den2
    geo = gt * ef / den2
    qx = gef * Xf + geo * Xo
    qy = gef * Yf + geo * Yo
    qw = gef * one + geo * one
    xa, ya, wa = pos_b[va, 0], pos_b[va, 1], pos_b[va, 3]
    xb, yb, wb = pos_b[vb, 0], pos_b[vb, 1], pos_b[vb, 3]
    # grad a' = b' x Q, grad b' = Q x a'.
    grad_pos_b[va, 0] += yb * qw - wb * qy
    grad_pos_b[va, 1] += wb * qx - xb * qw
    grad_pos_b[va, 3] += xb * qy - yb * qx
    grad_pos_b[vb, 0] += qy * wa - qw * ya
    grad_pos_b[vb, 1] += qw * xa - qx * wa
    grad_pos_b[vb, 3] += qx * ya - qy * xa


@numba.njit(cache=True, error_model="numpy", inline="always")
def _backward_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, grad_out, b, i0, j0, i1, j1, r0, r1, scatter,
                   grad_color, grad_pos_b):
    """Pair (p0, p1)'s part of grad_color for its pixels in the rows [r0, r1), and (scatter) of grad_pos."""
    H, W, C = color.shape[1], color.shape[2], color.shape[3]
    dst, a, sign, va, vb, ef, eo, Xf, Yf, Xo, Yo = _pair(pos_b, tri, psil_b, tri_id_b, depth_b, H, W, i0, j0, i1, j1)
    if dst < 0:
        return
    di, dj, si, sj = (i0, j0, i1, j1) if dst == 0 else (i1, j1, i0, j0)
    if di >= r0 and di < r1:
        for c in range(C):
            grad_color[b, di, dj, c] -= a * grad_out[b, di, dj, c]
    if si >= r0 and si < r1:
        for c in range(C):
            grad_color[b, si, sj, c] += a * grad_out[b, di, dj, c]
    if scatter:
        ga = pos_b.dtype.type(0)
        for c in range(C):
            ga += grad_out[b, di, dj, c] * (color[b, si, sj, c] - color[b, di, dj, c])
        if ga != 0:
            _scatter_edge_grad(pos_b, va, vb, sign * ga, ef, eo, Xf, Yf, Xo, Yo, grad_pos_b)


@numba.njit(cache=True, parallel=True, error_model="numpy")
def antialias_bwd(color, tri_id, depth, pos, tri, psil, grad_out, n_bands, grad_color, grad_pos_part):
    """CPU twin of the CUDA kernel antialias_bwd, per (image, band of rows) like antialias_fwd.

    grad_color (B, H, W, C) gets each pixel's terms in the forward's order (as antialias_fwd walks the
    pairs). grad_pos is a scatter: work splits over (image, band of rows) units u = b * n_bands + band,
    each with a private accumulator grad_pos_part[u] (V, 4) that the caller sums; a pair across two
    bands is scattered by the band of its upper row only.
    """
    B, H, W, C = color.shape
    for unit in prange(B * n_bands):
        b = unit // n_bands
        band = unit % n_bands
        r0 = band * H // n_bands
        r1 = (band + 1) * H // n_bands
        pb = b if pos.shape[0] > 1 else 0
        pos_b = pos[pb]
        psil_b = psil[b]
        tri_id_b = tri_id[b]
        depth_b = depth[b]
        gp = grad_pos_part[unit]
        for i in range(r0, r1):
            for j in range(W):
                for c in range(C):
                    grad_color[b, i, j, c] = grad_out[b, i, j, c]
            for j in range(W - 1):
                _backward_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, grad_out, b, i, j, i, j + 1, r0, r1,
                               True, grad_color, gp)
            if i > 0:
                for j in range(W):
                    _backward_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, grad_out, b, i - 1, j, i, j, r0,
                                   r1, i > r0, grad_color, gp)
        if r1 < H:
            for j in range(W):
                _backward_pair(color, pos_b, tri, psil_b, tri_id_b, depth_b, grad_out, b, r1 - 1, j, r1, j, r0, r1,
                               True, grad_color, gp)


# --------------------------------------------------------------------------------------------------
# GPU path: kernels/antialias.cu.
# --------------------------------------------------------------------------------------------------

# --fmad=false: no fused multiply-adds, so the GPU's float32 arithmetic is the Numba twin's.
_gpu_kernel = KernelFile("antialias.cu", ("antialias_silhouettes", "antialias_silhouette_pixels", "antialias_fwd",
                                          "antialias_bwd"),
                         ("--fmad=false",))


# --------------------------------------------------------------------------------------------------
# Public ops.
# --------------------------------------------------------------------------------------------------

def _check_topology(topology, tri):
    """topology checked against tri (T, 3), or built from tri when None."""
    T = tri.shape[0]
    if topology is None:
        return antialias_topology(tri)
    if not isinstance(topology, AntialiasTopology):
        raise TypeError(f"topology must be an AntialiasTopology from antialias_topology(); got "
                        f"{type(topology).__name__}")
    if topology.n_triangles != T:
        raise ValueError(f"topology was built for {topology.n_triangles} triangles; tri has {T}")
    _checks.check_array("topology.opposite", topology.opposite, np.int32, (T, 3))
    return topology


def _check_positions(pos, on_gpu):
    """Checks pos ((B, V, 4) or (V, 4), float32, or float64 on the CPU); returns whether it is batched."""
    dtypes = (np.float32,) if on_gpu else (np.float32, np.float64)
    try:
        batched = _checks.check_array("pos", pos, dtypes, ("B", "V", 4), ("V", 4)) == 0
    except TypeError as err:
        raise TypeError(f"{err} (the GPU path takes float32 only)" if on_gpu else str(err)) from None
    _checks.check_finite("pos", pos)
    return batched


def _check_raster_and_mesh(raster, pos, tri, B, H, W, batched):
    """Checks raster.tri_id against (B, H, W) and tri's T triangles, tri against pos's V vertices."""
    _checks.check_array("raster.tri_id", raster.tri_id, np.int32, (B, H, W))
    if batched and pos.shape[0] != B:
        raise ValueError(f"batch sizes differ: pos has {pos.shape[0]} images, the raster has {B}")
    _checks.check_array("tri", tri, np.int32, ("T", 3))
    T = tri.shape[0]
    _checks.check_indices("tri", tri, pos.shape[-2])
    if _checks.value_checks_enabled() and not _checks.queue_on_device(
            raster.tri_id, -1, T - 1, "raster.tri_id {} holds triangle ids outside [-1, {}] for the {} triangles "
            "of tri", raster.tri_id.shape, T - 1, T):
        lo, hi = int(raster.tri_id.min()), int(raster.tri_id.max())
        if lo < -1 or hi >= T:
            raise ValueError(f"raster.tri_id holds triangle ids in [{lo}, {hi}], outside [-1, {T - 1}] for the "
                             f"{T} triangles of tri")


def _check_raster_type(raster):
    if not isinstance(raster, Raster):
        raise TypeError(f"raster must be a Raster (the result of rasterize); got {type(raster).__name__}")


def _prepare(color, raster, pos, tri, topology, grad_out=None, backward=False, silhouettes=None):
    """Checks the inputs; returns (xp, B, H, W, C, pos batched, per-pixel silhouette masks)."""
    _check_raster_type(raster)
    xp = array_module(("color", color), ("pos", pos), ("tri", tri), ("raster.tri_id", raster.tri_id),
                      ("raster.depth", raster.depth), ("grad_out", grad_out),
                      ("topology.opposite", getattr(topology, "opposite", None)), ("silhouettes", silhouettes))
    on_gpu = xp is not np
    dtypes = (np.float32,) if on_gpu else (np.float32, np.float64)
    try:
        _checks.check_array("color", color, dtypes, ("B", "H", "W", "C"))
    except TypeError as err:
        raise TypeError(f"{err} (the GPU path takes float32 only)" if on_gpu else str(err)) from None
    batched = _check_positions(pos, on_gpu)
    if pos.dtype != color.dtype:
        raise TypeError(f"pos must have the dtype of color ({color.dtype}); got {_checks.describe(pos)}")
    B, H, W, C = color.shape
    _check_raster_and_mesh(raster, pos, tri, B, H, W, batched)
    _checks.check_array("raster.depth", raster.depth, color.dtype, (B, H, W))
    if backward:  # a None grad_out fails here with a TypeError naming it
        _checks.check_array("grad_out", grad_out, color.dtype, tuple(color.shape))
        _checks.check_finite("grad_out", grad_out)
    _checks.check_finite("color", color)
    if silhouettes is not None:
        if getattr(silhouettes, "ndim", None) == 2:
            raise ValueError(f"silhouettes must be per pixel, (B, H, W) = {(B, H, W)} from silhouette_pixels(raster, "
                             f"pos, tri); got {_checks.describe(silhouettes)}, per-triangle masks (silhouette_edges?)")
        _checks.check_array("silhouettes", silhouettes, np.uint8, (B, H, W))
        return xp, B, H, W, C, batched, silhouettes  # the topology is needed only to find them
    topology = _check_topology(topology, tri)
    return xp, B, H, W, C, batched, _silhouette_pixels(xp, raster, pos, tri, topology, batched)


def _silhouette_pixels(xp, raster, pos, tri, topology, batched):
    """(B, H, W) uint8 silhouette bits of each pixel's triangle, of checked inputs."""
    B, H, W = raster.tri_id.shape
    T, V = tri.shape[0], pos.shape[-2]
    if xp is not np:
        psil = xp.empty((B, H, W), dtype=xp.uint8)
        _gpu_kernel("antialias_silhouette_pixels")(*_grid_2d(H * W, B), (
            _as_gpu_input(pos, xp), _as_gpu_input(tri, xp), _as_gpu_input(topology.opposite, xp),
            xp.ascontiguousarray(raster.tri_id), np.int32(B), np.int32(V), np.int32(T), np.int32(H), np.int32(W),
            np.int32(batched), psil))
        return psil
    psil = np.empty((B, H, W), np.uint8)
    silhouette_pixel_masks(np.ascontiguousarray(pos if batched else pos[None]), np.ascontiguousarray(tri),
                           np.ascontiguousarray(topology.opposite), np.ascontiguousarray(raster.tri_id),
                           _n_bands(B, H), psil)
    return psil


def silhouette_edges(pos, tri, topology=None):
    """Which edges of each triangle are silhouette edges, as `antialias` finds them (module docstring, step 1).

    Args:
        pos: (B, V, 4) or (V, 4) clip-space positions. tri: (T, 3) int32. topology: as for `antialias`.

    Returns:
        (B or 1, T) uint8 on pos's device: bit k of [b, t] is set when edge k of triangle t (the edge
        opposite corner k) is a silhouette edge in image b.
    """
    xp = array_module(("pos", pos), ("tri", tri), ("topology.opposite", getattr(topology, "opposite", None)))
    batched = _check_positions(pos, xp is not np)
    _checks.check_array("tri", tri, np.int32, ("T", 3))
    _checks.check_indices("tri", tri, pos.shape[-2])
    topology = _check_topology(topology, tri)
    T, V = tri.shape[0], pos.shape[-2]
    NB = pos.shape[0] if batched else 1
    if xp is not np:
        sil = xp.empty((NB, T), dtype=xp.uint8)
        _gpu_kernel("antialias_silhouettes")(*_grid_2d(T, NB), (
            _as_gpu_input(pos, xp), _as_gpu_input(tri, xp), _as_gpu_input(topology.opposite, xp), np.int32(NB), np.int32(V),
            np.int32(T), sil))
        return sil
    sil = np.empty((NB, T), np.uint8)
    silhouette_masks(np.ascontiguousarray(pos if batched else pos[None]), np.ascontiguousarray(tri),
                     np.ascontiguousarray(topology.opposite), sil)
    return sil


def silhouette_pixels(raster, pos, tri, topology=None):
    """The silhouette edges of each pixel's triangle: what `antialias` and `antialias_backward` read.

    They find them themselves; a caller that runs both on the same raster and positions (a render
    chain, a fitting step) finds them once here and passes them to both as `silhouettes=`.

    Args:
        raster: the `Raster` that `rasterize(pos, tri, ...)` returned (tri_id is read).
        pos: (B, V, 4) or (V, 4) clip-space positions given to `rasterize`. tri: (T, 3) int32.
        topology: as for `antialias`.

    Returns:
        (B, H, W) uint8 on pos's device: bit k of [b, i, j] is set when edge k of the triangle at pixel
        (i, j) is a silhouette edge in image b (`silhouette_edges`); 0 where the pixel is empty.
    """
    _check_raster_type(raster)
    xp = array_module(("pos", pos), ("tri", tri), ("raster.tri_id", raster.tri_id),
                      ("topology.opposite", getattr(topology, "opposite", None)))
    batched = _check_positions(pos, xp is not np)
    _checks.check_array("raster.tri_id", raster.tri_id, np.int32, ("B", "H", "W"))
    B, H, W = raster.tri_id.shape
    _check_raster_and_mesh(raster, pos, tri, B, H, W, batched)
    return _silhouette_pixels(xp, raster, pos, tri, _check_topology(topology, tri), batched)


def antialias(color, raster, pos, tri, topology=None, silhouettes=None):
    """Blends colours across silhouette edges by where the edges cross between pixel centres.

    Args:
        color: (B, H, W, C) float32 image to antialias (usually `interpolate`'s output), numpy or cupy
            (float64 on the CPU, for gradient checks).
        raster: the `Raster` that `rasterize(pos, tri, ...)` returned (tri_id and depth are read).
        pos: (B, V, 4) or (V, 4) clip-space positions given to `rasterize`, the dtype of color.
        tri: (T, 3) int32 triangles given to `rasterize`.
        topology: optional `antialias_topology(tri)`. Pass it when the mesh is fixed (the fast path):
            built here otherwise, on every call, on the host (for cupy, with copies both ways).
        silhouettes: optional `silhouette_pixels(raster, pos, tri, topology)` (found here otherwise);
            pass the same to `antialias_backward` to find them once.

    Returns:
        (B, H, W, C), the dtype of color: color where no silhouette edge passes between a pixel and a
        neighbour, blended toward the neighbour's colour by how far the edge passes into or stops short
        of the pixel otherwise (see the module docstring).
    """
    xp, B, H, W, C, batched, psil = _prepare(color, raster, pos, tri, topology, silhouettes=silhouettes)
    V = pos.shape[-2]
    if xp is not np:
        out = xp.empty((B, H, W, C), dtype=xp.float32)
        _gpu_kernel("antialias_fwd")(*_grid_2d(H * W, B), (
            _as_gpu_input(color, xp), xp.ascontiguousarray(raster.tri_id), _as_gpu_input(raster.depth, xp),
            _as_gpu_input(pos, xp), _as_gpu_input(tri, xp), xp.ascontiguousarray(psil), np.int32(B), np.int32(V),
            np.int32(H), np.int32(W), np.int32(C), np.int32(batched), out))
        return out
    out = np.empty(color.shape, color.dtype)
    antialias_fwd(np.ascontiguousarray(color), np.ascontiguousarray(raster.tri_id),
                  np.ascontiguousarray(raster.depth), np.ascontiguousarray(pos if batched else pos[None]),
                  np.ascontiguousarray(tri), np.ascontiguousarray(psil), _n_bands(B, H), out)
    return out


def antialias_backward(color, raster, pos, tri, grad_out, topology=None, silhouettes=None):
    """Backward of `antialias`.

    Args:
        color, raster, pos, tri, topology, silhouettes: as given to `antialias`.
        grad_out: (B, H, W, C), the gradient of a loss with respect to antialias's output.

    Returns:
        (grad_color, grad_pos): grad_color (B, H, W, C); grad_pos shaped like pos (summed over the
        images for (V, 4) positions), nonzero only in the x, y and w columns of silhouette edges'
        vertices. The triangle ids and depths are held fixed (coverage is a step function).
    """
    xp, B, H, W, C, batched, psil = _prepare(color, raster, pos, tri, topology, grad_out, backward=True,
                                             silhouettes=silhouettes)
    V = pos.shape[-2]
    if xp is not np:
        grad_color = xp.empty((B, H, W, C), dtype=xp.float32)
        grad_pos = xp.zeros(pos.shape, dtype=xp.float32)
        _gpu_kernel("antialias_bwd")(*_grid_2d(H * W, B), (
            _as_gpu_input(color, xp), xp.ascontiguousarray(raster.tri_id), _as_gpu_input(raster.depth, xp),
            _as_gpu_input(pos, xp), _as_gpu_input(tri, xp), xp.ascontiguousarray(psil), _as_gpu_input(grad_out, xp),
            np.int32(B), np.int32(V), np.int32(H), np.int32(W), np.int32(C), np.int32(batched), grad_color,
            grad_pos))
        return grad_color, grad_pos
    n_bands = _n_bands(B, H)
    grad_color = np.empty(color.shape, color.dtype)
    grad_pos_part = np.zeros((B * n_bands, V, 4), color.dtype)
    antialias_bwd(np.ascontiguousarray(color), np.ascontiguousarray(raster.tri_id),
                  np.ascontiguousarray(raster.depth), np.ascontiguousarray(pos if batched else pos[None]),
                  np.ascontiguousarray(tri), np.ascontiguousarray(psil), np.ascontiguousarray(grad_out), n_bands,
                  grad_color, grad_pos_part)
    grad_pos = grad_pos_part.reshape(B, n_bands, V, 4).sum(1) if n_bands > 1 else grad_pos_part
    if not batched:
        grad_pos = grad_pos.sum(0)
    return grad_color, grad_pos
