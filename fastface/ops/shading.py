"""Spherical-harmonics (Lambertian, bands 0-2) vertex shading, forward and backward.

The irradiance form of docs/conventions.md (Ramamoorthi & Hanrahan 2001, "An efficient representation for
irradiance environment maps", eq. 7-8):

    colour_c = albedo_c * sum_k sh[k, c] * A_l(k) * Y_k(n)

with A_0 = pi, A_1 = 2 pi / 3, A_2 = pi / 4 and the 9 real basis functions in the order
1, y, z, x, xy, yz, 3z^2 - 1, xz, x^2 - y^2 (times their constants). Writing Y_k = c_k P_k with P_k
the bare polynomial and K_k = A_l(k) c_k, the irradiance of channel c is E_c = sum_k K_k sh[k,c] P_k.

Backward, with g the gradient of the colour and ga_c = g_c albedo_c:
    grad_albedo_c = g_c E_c
    grad_sh[k, c] = K_k sum over vertices of ga_c P_k(n)        (a reduction over V)
    grad_n        = sum_k w_k grad P_k(n), w_k = sum_c ga_c K_k sh[k, c]

The normals are used as given (the op does not normalise them); `vertex_normals` makes them unit.

`shade_vertices` is `sh_shade(vertex_normals(vertices, tri), albedo, sh)` fused: its forward
computes each vertex's normal and colour in one pass without writing the normals, and its
backward computes the SH gradients and the gradient of the summed (un-normalised) vertex normal
in one pass, followed by `vertex_normals`' gather pass. On the GPU that moves 11 instead of 16
(B, V, 3) arrays through memory for a forward + backward.

GPU kernels that moved the (B, V, 3) arrays through shared-memory tiles (contiguous global accesses)
measured slower on an H200 than these direct per-thread accesses (64 x 35,721 vertices: forward
42.6 vs 28.6 us, backward 124 vs 45.8 us) and were removed.
"""
import math

import numba
import numpy as np

from fastface._backend import KernelFile, array_module, images_on_grid_y
from fastface._checks import check_accumulator, check_array, check_finite, check_same_batch
# The fused kernels call normals' Numba helpers and launch its gather kernel. Numba's cache does not
# notice edits to another module: after changing normals.py's helpers, clear the cache (or touch
# this file) before trusting the fused CPU kernels.
from fastface.ops import normals as _normals

__all__ = ["SH_BAND_FACTORS", "sh_shade", "sh_shade_backward", "shade_vertices", "shade_vertices_backward"]

_C0 = 1.0 / (2.0 * math.sqrt(math.pi))          # 0.282095
_C1 = math.sqrt(3.0) / (2.0 * math.sqrt(math.pi))   # 0.488603
_C2 = math.sqrt(15.0) / (2.0 * math.sqrt(math.pi))  # 1.092548
_C3 = math.sqrt(5.0) / (4.0 * math.sqrt(math.pi))   # 0.315392
_C4 = math.sqrt(15.0) / (4.0 * math.sqrt(math.pi))  # 0.546274
_A0, _A1, _A2 = math.pi, 2.0 * math.pi / 3.0, math.pi / 4.0

#: K_k = A_l(k) * c_k: the factor of the bare polynomial P_k in the irradiance (kernels/shading.cu
#: holds the same numbers).
SH_BAND_FACTORS = np.array([_A0 * _C0, _A1 * _C1, _A1 * _C1, _A1 * _C1, _A2 * _C2, _A2 * _C2,
                            _A2 * _C3, _A2 * _C2, _A2 * _C4])

# Vertices per chunk of the CPU kernels. The backward keeps one grad_sh partial per chunk, summed in
# chunk order afterwards, so the result does not depend on the number of threads.
_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/shading.cu, same argument order). Per-vertex helpers are
# shared by the plain and the fused kernels, as the CUDA device functions are.

@numba.njit(cache=True)
def _coefficients(sh, factors):
    """(B, 9, 3) float64 K_k sh[b, k, c]."""
    coef = np.empty((sh.shape[0], 9, 3))
    for b in range(sh.shape[0]):
        for k in range(9):
            for c in range(3):
                coef[b, k, c] = sh[b, k, c] * factors[k]
    return coef


@numba.njit(cache=True, inline="always")
def _basis(x, y, z):
    """The bare polynomials P_0..P_8 in the conventions' order (float64: a homogeneous tuple)."""
    fx, fy, fz = np.float64(x), np.float64(y), np.float64(z)
    return (1.0, fy, fz, fx, fx * fy, fy * fz, 3.0 * fz * fz - 1.0, fx * fz, fx * fx - fy * fy)


@numba.njit(cache=True, inline="always")
def _shade_vertex(coef, x, y, z, albedo, out):
    """out_c = albedo_c E_c at normal (x, y, z); coef is the batch element's (9, 3)."""
    p = _basis(x, y, z)
    for c in range(3):
        e = 0.0
        for k in range(9):
            e += coef[k, c] * p[k]
        out[c] = albedo[c] * e


@numba.njit(cache=True, inline="always")
def _shade_vertex_bwd(coef, x, y, z, albedo, grad, acc, w, grad_albedo, accumulate_albedo):
    """Backward at one vertex: adds ga_c P_k to acc (9, 3), writes (or adds) g_c E_c to
    grad_albedo (3,), returns grad_n. w is a (9,) scratch array."""
    p = _basis(x, y, z)
    w[:] = 0.0
    for c in range(3):
        g = grad[c]
        ga = g * albedo[c]
        e = 0.0
        for k in range(9):
            e += coef[k, c] * p[k]
            w[k] += ga * coef[k, c]
            acc[k, c] += ga * p[k]
        if accumulate_albedo:
            grad_albedo[c] += g * e
        else:
            grad_albedo[c] = g * e
    return (w[3] + w[4] * y + w[7] * z + 2.0 * w[8] * x,
            w[1] + w[4] * x + w[5] * z - 2.0 * w[8] * y,
            w[2] + w[5] * y + 6.0 * w[6] * z + w[7] * x)


@numba.njit(cache=True)
def _finish_grad_sh(partial, factors, grad_sh):
    """grad_sh[b, k, c] = K_k * the sum of the chunks' partials, in chunk order."""
    for b in range(grad_sh.shape[0]):
        for k in range(9):
            for c in range(3):
                s = 0.0
                for chunk in range(partial.shape[0]):
                    s += partial[chunk, b, k, c]
                grad_sh[b, k, c] = s * factors[k]


@numba.njit(cache=True, parallel=True)
def sh_shade_fwd(normals, albedo, sh, factors, out):
    """Per (batch, vertex). albedo is (B, V, 3), or (1, V, 3) shared by the batch."""
    B, V = normals.shape[0], normals.shape[1]
    shared = albedo.shape[0] != B
    coef = _coefficients(sh, factors)
    n_chunks = (V + _CHUNK - 1) // _CHUNK
    for job in numba.prange(B * n_chunks):
        b, chunk = job // n_chunks, job % n_chunks
        ab = 0 if shared else b
        for v in range(chunk * _CHUNK, min(V, (chunk + 1) * _CHUNK)):
            _shade_vertex(coef[b], normals[b, v, 0], normals[b, v, 1], normals[b, v, 2], albedo[ab, v], out[b, v])


@numba.njit(cache=True, parallel=True)
def sh_shade_bwd(normals, albedo, sh, factors, grad_out, grad_normals, grad_albedo, grad_sh):
    """Chunks of vertices in parallel, batch sequential inside a chunk: a chunk owns its vertices'
    grad_albedo (also when albedo is shared by the batch) and its own grad_sh partial."""
    B, V = normals.shape[0], normals.shape[1]
    shared = albedo.shape[0] != B
    coef = _coefficients(sh, factors)
    n_chunks = (V + _CHUNK - 1) // _CHUNK
    partial = np.zeros((n_chunks, B, 9, 3))
    if shared:
        grad_albedo[:] = 0.0
    for chunk in numba.prange(n_chunks):
        w = np.empty(9)
        for b in range(B):
            ab = 0 if shared else b
            for v in range(chunk * _CHUNK, min(V, (chunk + 1) * _CHUNK)):
                gx, gy, gz = _shade_vertex_bwd(coef[b], normals[b, v, 0], normals[b, v, 1], normals[b, v, 2],
                                               albedo[ab, v], grad_out[b, v], partial[chunk, b], w,
                                               grad_albedo[ab, v], shared)
                grad_normals[b, v, 0] = gx
                grad_normals[b, v, 1] = gy
                grad_normals[b, v, 2] = gz
    _finish_grad_sh(partial, factors, grad_sh)


@numba.njit(cache=True, parallel=True)
def shade_vertices_fwd(vertices, offsets, corners, albedo, sh, factors, out):
    """Per (batch, vertex): the area-weighted unit normal (as vertex_normals_fwd), then its colour."""
    B, V = vertices.shape[0], vertices.shape[1]
    shared = albedo.shape[0] != B
    coef = _coefficients(sh, factors)
    n_chunks = (V + _CHUNK - 1) // _CHUNK
    for job in numba.prange(B * n_chunks):
        b, chunk = job // n_chunks, job % n_chunks
        ab = 0 if shared else b
        vb = vertices[b]
        for v in range(chunk * _CHUNK, min(V, (chunk + 1) * _CHUNK)):
            sx, sy, sz = _normals._summed_normal(vb, offsets, corners, v)
            inv = _normals._inverse_length(sx, sy, sz, vb.dtype.type(1))
            _shade_vertex(coef[b], sx * inv, sy * inv, sz * inv, albedo[ab, v], out[b, v])


@numba.njit(cache=True, parallel=True)
def shade_vertices_bwd_sum(vertices, offsets, corners, albedo, sh, factors, grad_out, grad_sum, grad_albedo, grad_sh,
                           accumulate):
    """sh_shade_bwd at the recomputed normals, then, instead of grad_normals, the gradient of the
    summed normal s, (grad_n - n (n . grad_n)) / |s| (vertex_normals_bwd_sum's formula).
    accumulate: add grad_albedo to what the array holds."""
    B, V = vertices.shape[0], vertices.shape[1]
    shared = albedo.shape[0] != B
    coef = _coefficients(sh, factors)
    n_chunks = (V + _CHUNK - 1) // _CHUNK
    partial = np.zeros((n_chunks, B, 9, 3))
    if shared and not accumulate:
        grad_albedo[:] = 0.0
    for chunk in numba.prange(n_chunks):
        w = np.empty(9)
        for b in range(B):
            ab = 0 if shared else b
            vb = vertices[b]
            for v in range(chunk * _CHUNK, min(V, (chunk + 1) * _CHUNK)):
                sx, sy, sz = _normals._summed_normal(vb, offsets, corners, v)
                inv = _normals._inverse_length(sx, sy, sz, vb.dtype.type(1))
                nx, ny, nz = sx * inv, sy * inv, sz * inv
                gx, gy, gz = _shade_vertex_bwd(coef[b], nx, ny, nz, albedo[ab, v], grad_out[b, v], partial[chunk, b],
                                               w, grad_albedo[ab, v], shared or accumulate)
                ndotg = nx * gx + ny * gy + nz * gz
                grad_sum[b, v, 0] = (gx - nx * ndotg) * inv
                grad_sum[b, v, 1] = (gy - ny * ndotg) * inv
                grad_sum[b, v, 2] = (gz - nz * ndotg) * inv
    _finish_grad_sh(partial, factors, grad_sh)


# ---------------------------------------------------------------------------------------------
# Dispatch

_BLOCK = 256               # threads per block on the GPU (>= 27: the first 27 load the coefficients)
_VERTICES_PER_THREAD = 8   # backward: amortises each block's 27-value reduction over more vertices


_GPU_NAMES = tuple(f"{kernel}<{shared}>"
                   for kernel in ("sh_shade_fwd", "sh_shade_bwd", "shade_vertices_fwd", "shade_vertices_bwd_sum")
                   for shared in ("false", "true"))
_KERNELS = KernelFile("shading.cu", _GPU_NAMES)


def _check_lighting(xp, batched, dtype, B, V, albedo, sh):
    """Checks albedo and sh against per-vertex inputs of batch B (batched or not) and V vertices;
    returns albedo as (B or 1, V, 3) and sh as (B, 9, 3), contiguous."""
    if batched:
        check_array("sh", sh, dtype, (B, 9, 3))
        check_array("albedo", albedo, dtype, (B, V, 3), (V, 3))
    else:
        check_array("sh", sh, dtype, (9, 3))
        check_array("albedo", albedo, dtype, (V, 3))
    check_finite("albedo", albedo)
    check_finite("sh", sh)
    c = xp.ascontiguousarray
    return c(albedo if albedo.ndim == 3 else albedo[None]), c(sh if batched else sh[None])


def _prepare(normals, albedo, sh, grad_out=None, backward=False):
    """Checks the inputs; returns (xp, batched, normals (B,V,3), albedo (B|1,V,3), sh (B,9,3), grad_out)."""
    xp = array_module(("normals", normals), ("albedo", albedo), ("sh", sh), ("grad_out", grad_out))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    try:
        batched = check_array("normals", normals, dtypes, ("B", "V", 3), ("V", 3)) == 0
    except TypeError as e:
        raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None
    if batched and hasattr(sh, "shape") and len(sh.shape) == 3:
        check_same_batch(("normals", "sh"), (normals, sh))
    if batched and hasattr(albedo, "shape") and len(albedo.shape) == 3:
        check_same_batch(("normals", "albedo"), (normals, albedo))
    a3, s3 = _check_lighting(xp, batched, normals.dtype, normals.shape[0], normals.shape[-2], albedo, sh)
    if backward:  # a None grad_out fails here with a TypeError naming it
        check_array("grad_out", grad_out, normals.dtype, tuple(normals.shape))
        check_finite("grad_out", grad_out)
    check_finite("normals", normals)
    c = xp.ascontiguousarray
    n3 = c(normals if batched else normals[None])
    g3 = c(grad_out if batched else grad_out[None]) if backward else None
    return xp, batched, n3, a3, s3, g3


def _launch_shape(V, B, backward):
    """(grid, block) of the shading kernels: blocks over V times the batch."""
    per_block = _BLOCK * (_VERTICES_PER_THREAD if backward else 1)
    return (max(1, (V + per_block - 1) // per_block), images_on_grid_y(B, "SH shading")), (_BLOCK,)


def _backward_outputs(xp, a3, s3, B, add_to_albedo=None):
    """grad_albedo and grad_sh, zeroed where the GPU kernel adds into them atomically; grad_albedo is the
    caller's add_to_albedo (checked) when given."""
    shared = a3.shape[0] != B
    grad_sh = xp.empty_like(s3) if xp is np else xp.zeros_like(s3)
    if add_to_albedo is not None:
        return add_to_albedo.reshape(a3.shape), grad_sh, shared
    if xp is np:
        return xp.empty_like(a3), grad_sh, shared
    return (xp.zeros_like(a3) if shared else xp.empty_like(a3)), grad_sh, shared


def _template(name, shared):
    """The CUDA function `name<shared>`."""
    return _KERNELS(f"{name}<{'true' if shared else 'false'}>")


def sh_shade(normals, albedo, sh):
    """Per-vertex colours under spherical-harmonics lighting (the SH layout of docs/conventions.md).

    Args:
        normals: (B, V, 3) or (V, 3) float32 (float64 also on the CPU) unit normals in camera
            space, numpy or cupy.
        albedo: (B, V, 3), or (V, 3) shared by the batch; the dtype of normals.
        sh: (B, 9, 3) SH coefficients (basis k, RGB); (9, 3) when normals are (V, 3).

    Returns:
        (B, V, 3) colours (or (V, 3) for unbatched normals), the dtype of normals.
    """
    xp, batched, n3, a3, s3, _ = _prepare(normals, albedo, sh)
    out = xp.empty_like(n3)
    B, V = n3.shape[0], n3.shape[1]
    if xp is np:
        sh_shade_fwd(n3, a3, s3, SH_BAND_FACTORS, out)
    else:
        _template("sh_shade_fwd", a3.shape[0] != B)(
            *_launch_shape(V, B, False), (n3, a3, s3, out, np.int32(B), np.int32(V)))
    return out if batched else out[0]


def sh_shade_backward(normals, albedo, sh, grad_out):
    """Gradients of `sh_shade`.

    Args:
        normals, albedo, sh: as for `sh_shade`.
        grad_out: gradient of the colours, shaped and typed like the colours.

    Returns:
        (grad_normals, grad_albedo, grad_sh) shaped like normals, albedo (summed over the batch
        when albedo is shared) and sh. On the GPU grad_sh is summed per block and then with one
        atomicAdd per block and coefficient, and a shared albedo's gradient with one atomicAdd
        per batch element: their last bits depend on the order the blocks finish in.
    """
    xp, batched, n3, a3, s3, g3 = _prepare(normals, albedo, sh, grad_out, backward=True)
    B, V = n3.shape[0], n3.shape[1]
    grad_normals = xp.empty_like(n3)
    grad_albedo, grad_sh, shared = _backward_outputs(xp, a3, s3, B)
    if xp is np:
        sh_shade_bwd(n3, a3, s3, SH_BAND_FACTORS, g3, grad_normals, grad_albedo, grad_sh)
    else:
        _template("sh_shade_bwd", shared)(
            *_launch_shape(V, B, True),
            (n3, a3, s3, g3, grad_normals, grad_albedo, grad_sh, np.int32(B), np.int32(V)))
    if not batched:
        return grad_normals[0], grad_albedo[0], grad_sh[0]
    return grad_normals, (grad_albedo[0] if albedo.ndim == 2 else grad_albedo), grad_sh


def _prepare_fused(vertices, tri, albedo, sh, adjacency, grad_out=None, backward=False):
    xp, batched, v3, adjacency, g3 = _normals._prepare(vertices, tri, adjacency, grad_out, backward)
    array_module(("vertices", vertices), ("albedo", albedo), ("sh", sh))
    if batched and hasattr(sh, "shape") and len(sh.shape) == 3:
        check_same_batch(("vertices", "sh"), (vertices, sh))
    a3, s3 = _check_lighting(xp, batched, vertices.dtype, v3.shape[0], v3.shape[1], albedo, sh)
    return xp, batched, v3, adjacency, a3, s3, g3


def shade_vertices(vertices, tri, albedo, sh, adjacency=None):
    """`sh_shade(vertex_normals(vertices, tri, adjacency), albedo, sh)` in one pass.

    Args:
        vertices: (B, V, 3) or (V, 3) camera-space positions, float32 (float64 also on the CPU).
        tri, adjacency: as for `vertex_normals` (pass the adjacency when the topology is fixed).
        albedo, sh: as for `sh_shade`.

    Returns:
        (B, V, 3) (or (V, 3)) colours.
    """
    xp, batched, v3, adjacency, a3, s3, _ = _prepare_fused(vertices, tri, albedo, sh, adjacency)
    B, V = v3.shape[0], v3.shape[1]
    out = xp.empty_like(v3)
    if xp is np:
        shade_vertices_fwd(v3, adjacency.offsets, adjacency.corners, a3, s3, SH_BAND_FACTORS, out)
    else:
        _template("shade_vertices_fwd", a3.shape[0] != B)(
            *_launch_shape(V, B, False),
            (v3, adjacency.offsets, adjacency.corners, a3, s3, out, np.int32(B), np.int32(V)))
    return out if batched else out[0]


def shade_vertices_backward(vertices, tri, albedo, sh, grad_out, adjacency=None, *, add_to_albedo=None):
    """Gradients of `shade_vertices`.

    Args:
        vertices, tri, albedo, sh, adjacency: as for `shade_vertices`.
        grad_out: gradient of the colours, shaped and typed like the colours.
        add_to_albedo: keyword only, optional C-contiguous array shaped and typed like albedo, on its
            device: grad_albedo is added into it in place (and it is returned as grad_albedo). The
            training step adds one level's albedo gradient to the other's this way.

    Returns:
        (grad_vertices, grad_albedo, grad_sh), as `vertex_normals_backward` and
        `sh_shade_backward` chained would give them.
    """
    xp, batched, v3, adjacency, a3, s3, g3 = _prepare_fused(vertices, tri, albedo, sh, adjacency, grad_out,
                                                            backward=True)
    B, V = v3.shape[0], v3.shape[1]
    grad_sum = xp.empty_like(v3)  # scratch: the gradient of the summed (un-normalised) normals
    grad_vertices = xp.empty_like(v3)
    accumulate = add_to_albedo is not None
    if accumulate:
        check_accumulator("add_to_albedo", add_to_albedo, albedo, xp,
                          (("vertices", vertices), ("albedo", albedo), ("grad_out", grad_out)))
    grad_albedo, grad_sh, shared = _backward_outputs(xp, a3, s3, B, add_to_albedo)
    offsets, corners = adjacency.offsets, adjacency.corners
    if xp is np:
        shade_vertices_bwd_sum(v3, offsets, corners, a3, s3, SH_BAND_FACTORS, g3, grad_sum, grad_albedo, grad_sh,
                               accumulate)
        _normals.vertex_normals_bwd(v3, offsets, corners, grad_sum, grad_vertices)
    else:
        _template("shade_vertices_bwd_sum", shared)(
            *_launch_shape(V, B, True),
            (v3, offsets, corners, a3, s3, g3, grad_sum, grad_albedo, grad_sh, np.int32(B), np.int32(V),
             np.int32(accumulate)))
        _normals._launch("bwd", B, V, (v3, offsets, corners, grad_sum, grad_vertices))
    if accumulate:
        grad_albedo = add_to_albedo
    elif not batched or albedo.ndim == 2:
        grad_albedo = grad_albedo[0]
    if not batched:
        return grad_vertices[0], grad_albedo, grad_sh[0]
    return grad_vertices, grad_albedo, grad_sh
