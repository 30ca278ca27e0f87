"""Spherical-harmonics (Lambertian, bands 0-2) vertex shading, forward and backward.

DESIGN.md's irradiance form (Ramamoorthi & Hanrahan 2001, "An efficient representation for
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
"""
import math

import numba
import numpy as np

from fastface._backend import array_module, cuda_module
from fastface._checks import check_array, check_finite, check_same_batch

__all__ = ["SH_BAND_FACTORS", "sh_shade", "sh_shade_backward"]

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

# Vertices per chunk of the CPU backward: each chunk keeps its own grad_sh partial, summed in chunk
# order afterwards, so the result does not depend on the number of threads.
_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/shading.cu, same argument order)

@numba.njit(cache=True)
def _basis(x, y, z):
    """The bare polynomials P_0..P_8 in DESIGN.md's order (float64: a homogeneous tuple)."""
    fx, fy, fz = np.float64(x), np.float64(y), np.float64(z)
    return (1.0, fy, fz, fx, fx * fy, fy * fz, 3.0 * fz * fz - 1.0, fx * fz, fx * fx - fy * fy)


@numba.njit(cache=True)
def _coefficients(sh, factors):
    coef = np.empty((sh.shape[0], 9, 3))
    for b in range(sh.shape[0]):
        for k in range(9):
            for c in range(3):
                coef[b, k, c] = sh[b, k, c] * factors[k]
    return coef


@numba.njit(cache=True, parallel=True)
def sh_shade_fwd(normals, albedo, sh, factors, out):
    """One iteration per (batch, vertex). albedo is (B, V, 3), or (1, V, 3) shared by the batch."""
    B, V = normals.shape[0], normals.shape[1]
    shared = albedo.shape[0] != B
    coef = _coefficients(sh, factors)
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        ab = 0 if shared else b
        p = _basis(normals[b, v, 0], normals[b, v, 1], normals[b, v, 2])
        for c in range(3):
            e = 0.0
            for k in range(9):
                e += coef[b, k, c] * p[k]
            out[b, v, c] = albedo[ab, v, c] * e


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
                x, y, z = normals[b, v, 0], normals[b, v, 1], normals[b, v, 2]
                p = _basis(x, y, z)
                w[:] = 0.0
                for c in range(3):
                    g = grad_out[b, v, c]
                    ga = g * albedo[ab, v, c]
                    e = 0.0
                    for k in range(9):
                        e += coef[b, k, c] * p[k]
                        w[k] += ga * coef[b, k, c]
                        partial[chunk, b, k, c] += ga * p[k]
                    if shared:
                        grad_albedo[0, v, c] += g * e
                    else:
                        grad_albedo[b, v, c] = g * e
                grad_normals[b, v, 0] = w[3] + w[4] * y + w[7] * z + 2.0 * w[8] * x
                grad_normals[b, v, 1] = w[1] + w[4] * x + w[5] * z - 2.0 * w[8] * y
                grad_normals[b, v, 2] = w[2] + w[5] * y + 6.0 * w[6] * z + w[7] * x
    for b in range(B):
        for k in range(9):
            for c in range(3):
                s = 0.0
                for chunk in range(n_chunks):
                    s += partial[chunk, b, k, c]
                grad_sh[b, k, c] = s * factors[k]


# ---------------------------------------------------------------------------------------------
# Dispatch

_BLOCK = 256               # threads per block on the GPU (>= 27: the first 27 load the coefficients)
_VERTICES_PER_THREAD = 8   # backward: amortises each block's 27-value reduction over more vertices


def _module():
    return cuda_module("shading.cu", name_expressions=(
        "sh_shade_fwd<false>", "sh_shade_fwd<true>", "sh_shade_bwd<false>", "sh_shade_bwd<true>"))


def _prepare(normals, albedo, sh, grad_out=None):
    """Checks the inputs; returns (xp, batched, normals (B,V,3), albedo (B|1,V,3), sh (B,9,3), grad_out)."""
    xp = array_module(("normals", normals), ("albedo", albedo), ("sh", sh), ("grad_out", grad_out))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    try:
        batched = check_array("normals", normals, dtypes, ("B", "V", 3), ("V", 3)) == 0
    except TypeError as e:
        raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None
    dtype, V = normals.dtype, normals.shape[-2]
    if batched:
        check_array("sh", sh, dtype, ("B", 9, 3))
        albedo_batched = check_array("albedo", albedo, dtype, ("B", V, 3), (V, 3)) == 0
        check_same_batch(("normals", "sh") + (("albedo",) if albedo_batched else ()),
                         (normals, sh) + ((albedo,) if albedo_batched else ()))
    else:
        check_array("sh", sh, dtype, (9, 3))
        check_array("albedo", albedo, dtype, (V, 3))
    if grad_out is not None:
        check_array("grad_out", grad_out, dtype, tuple(normals.shape[:-1]) + (3,))
        check_finite("grad_out", grad_out)
    for name, a in (("normals", normals), ("albedo", albedo), ("sh", sh)):
        check_finite(name, a)
    as3 = xp.ascontiguousarray
    n3 = as3(normals if batched else normals[None])
    a3 = as3(albedo if albedo.ndim == 3 else albedo[None])
    s3 = as3(sh if batched else sh[None])
    g3 = None if grad_out is None else as3(grad_out if batched else grad_out[None])
    return xp, batched, n3, a3, s3, g3


def sh_shade(normals, albedo, sh):
    """Per-vertex colours under spherical-harmonics lighting (DESIGN.md's SH layout).

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
    if xp is np:
        sh_shade_fwd(n3, a3, s3, SH_BAND_FACTORS, out)
    else:
        B, V = n3.shape[0], n3.shape[1]
        shared = "true" if a3.shape[0] != B else "false"
        _module().get_function(f"sh_shade_fwd<{shared}>")(
            ((V + _BLOCK - 1) // _BLOCK, B), (_BLOCK,), (n3, a3, s3, out, np.int32(B), np.int32(V)))
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
    xp, batched, n3, a3, s3, g3 = _prepare(normals, albedo, sh, grad_out)
    grad_normals = xp.empty_like(n3)
    grad_sh = xp.empty_like(s3) if xp is np else xp.zeros_like(s3)
    shared = a3.shape[0] != n3.shape[0]
    grad_albedo = xp.zeros_like(a3) if (shared and xp is not np) else xp.empty_like(a3)
    if xp is np:
        sh_shade_bwd(n3, a3, s3, SH_BAND_FACTORS, g3, grad_normals, grad_albedo, grad_sh)
    else:
        B, V = n3.shape[0], n3.shape[1]
        blocks = max(1, (V + _BLOCK * _VERTICES_PER_THREAD - 1) // (_BLOCK * _VERTICES_PER_THREAD))
        _module().get_function(f"sh_shade_bwd<{'true' if shared else 'false'}>")(
            (blocks, B), (_BLOCK,), (n3, a3, s3, g3, grad_normals, grad_albedo, grad_sh, np.int32(B), np.int32(V)))
    if not batched:
        return grad_normals[0], grad_albedo[0], grad_sh[0]
    return grad_normals, (grad_albedo[0] if albedo.ndim == 2 else grad_albedo), grad_sh
