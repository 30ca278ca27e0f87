"""Interpolation of per-vertex attributes over rasterized pixels, and its backward pass.

out[b, i, j] = u * attr[v0] + v * attr[v1] + (1 - u - v) * attr[v2], where (v0, v1, v2) are the
vertices of the triangle tri_id[b, i, j] and (u, v) = bary[b, i, j]; zeros where tri_id is -1.
The weights are summed in this order on both backends (CUDA twin: kernels/interpolate.cu).
`fastface.ops.rasterize.rasterize_interpolate` fuses this op into the rasterizer's last pass.
"""
import numba
import numpy as np
from numba import prange

from fastface import _checks
from fastface._backend import KernelFile, array_module
from fastface.ops.rasterize import (
    _as_gpu_input, _check_array, _check_attr, _check_raster, _check_tri_id_range, _float4_to_float3, _grid_2d,
    _n_bands,
)

__all__ = ["interpolate", "interpolate_backward"]


# --------------------------------------------------------------------------------------------------
# Numba twins of kernels/interpolate.cu.
# --------------------------------------------------------------------------------------------------

@numba.njit(cache=True, parallel=True, error_model="numpy")
def interpolate_fwd(attr, tri_id, bary, tri, out):
    """CPU twin of interpolate_fwd: attr (1 or B, V, C), tri_id (B, H, W), bary (B, H, W, 2),
    tri (T, 3) -> out (B, H, W, C). Parallel over image rows: every pixel writes only itself."""
    B, H, W = tri_id.shape
    V, C = attr.shape[1], attr.shape[2]
    one = bary.dtype.type(1)
    for row in prange(B * H):
        b = row // H
        i = row % H
        ab = attr[b] if attr.shape[0] > 1 else attr[0]
        for j in range(W):
            t = tri_id[b, i, j]
            ok = t >= 0 and t < tri.shape[0]
            if ok:
                v0, v1, v2 = tri[t, 0], tri[t, 1], tri[t, 2]
                ok = v0 >= 0 and v0 < V and v1 >= 0 and v1 < V and v2 >= 0 and v2 < V
            if not ok:
                for c in range(C):
                    out[b, i, j, c] = 0
                continue
            u = bary[b, i, j, 0]
            v = bary[b, i, j, 1]
            w2 = (one - u) - v
            for c in range(C):
                out[b, i, j, c] = (u * ab[v0, c] + v * ab[v1, c]) + w2 * ab[v2, c]


@numba.njit(cache=True, parallel=True, error_model="numpy")
def interpolate_bwd(attr, tri_id, bary, tri, grad_out, n_bands, n_chunks, grad_attr_part, grad_bary):
    """CPU twin of interpolate_bwd.

    grad_bary (B, H, W, 2) is written per pixel. grad_attr is a scatter: work splits over
    (image, band of rows) units u = b * n_bands + band, handed out to n_chunks threads in
    contiguous runs; instead of atomics every accumulator is private, grad_attr_part[u] (V, C) per
    unit for per-image attributes (attr.shape[0] > 1), grad_attr_part[chunk] per thread for shared
    ones, and the caller sums.
    """
    B, H, W = tri_id.shape
    V, C = attr.shape[1], attr.shape[2]
    zero = bary.dtype.type(0)
    one = bary.dtype.type(1)
    n_units = B * n_bands
    for chunk in prange(n_chunks):
        for unit in range(chunk * n_units // n_chunks, (chunk + 1) * n_units // n_chunks):
            b = unit // n_bands
            band = unit % n_bands
            ab = attr[b] if attr.shape[0] > 1 else attr[0]
            ga = grad_attr_part[unit] if attr.shape[0] > 1 else grad_attr_part[chunk]
            for i in range(band * H // n_bands, (band + 1) * H // n_bands):
                for j in range(W):
                    t = tri_id[b, i, j]
                    ok = t >= 0 and t < tri.shape[0]
                    if ok:
                        v0, v1, v2 = tri[t, 0], tri[t, 1], tri[t, 2]
                        ok = v0 >= 0 and v0 < V and v1 >= 0 and v1 < V and v2 >= 0 and v2 < V
                    if not ok:
                        grad_bary[b, i, j, 0] = zero
                        grad_bary[b, i, j, 1] = zero
                        continue
                    u = bary[b, i, j, 0]
                    v = bary[b, i, j, 1]
                    w2 = (one - u) - v
                    gu = zero
                    gv = zero
                    for c in range(C):
                        g = grad_out[b, i, j, c]
                        gu += g * (ab[v0, c] - ab[v2, c])
                        gv += g * (ab[v1, c] - ab[v2, c])
                        ga[v0, c] += u * g
                        ga[v1, c] += v * g
                        ga[v2, c] += w2 * g
                    grad_bary[b, i, j, 0] = gu
                    grad_bary[b, i, j, 1] = gv


# --------------------------------------------------------------------------------------------------
# GPU path: kernels/interpolate.cu, templated on the channel count (-1: any count at run time).
# --------------------------------------------------------------------------------------------------

_GPU_CHANNELS = (1, 2, 3, 4)
_GPU_NAMES = [f"interpolate_fwd<{c}>" for c in (-1,) + _GPU_CHANNELS] + [
    f"interpolate_bwd<{c}>" for c in (-1,) + _GPU_CHANNELS]


# --fmad=false: no fused multiply-adds, so the GPU's float32 arithmetic is the Numba twin's.
_gpu_kernel = KernelFile("interpolate.cu", _GPU_NAMES, ("--fmad=false",))


def _channels_name(op, C):
    return f"{op}<{C if C in _GPU_CHANNELS else -1}>"


# --------------------------------------------------------------------------------------------------
# Public ops.
# --------------------------------------------------------------------------------------------------

def _check_inputs(attr, raster, tri):
    xp = array_module(("attr", attr), ("tri", tri), ("raster.tri_id", getattr(raster, "tri_id", None)),
                      ("raster.bary", getattr(raster, "bary", None)))
    on_gpu = xp is not np
    bary_dtypes = (np.float32,) if on_gpu else (np.float32, np.float64)
    bary = getattr(raster, "bary", None)
    dtype = bary.dtype if getattr(bary, "dtype", None) in bary_dtypes else np.dtype(np.float32)
    H, W = _check_raster(raster, None, dtype)
    B = raster.tri_id.shape[0]
    _check_array("tri", tri, np.int32, ("T", 3))
    V = attr.shape[-2] if hasattr(attr, "shape") and len(attr.shape) >= 2 else 0
    _check_attr(attr, B, V, dtype, xp)
    _checks.check_indices("tri", tri, V)
    _check_tri_id_range(raster, tri.shape[0])
    return xp, B, H, W


def interpolate(attr, raster, tri):
    """Interpolates per-vertex attributes over the rasterized pixels.

    Args:
        attr: (V, C) or (B, V, C) float32, numpy or cupy (float64 on the CPU with a float64 raster).
        raster: the result of `rasterize`; attr must have the dtype of raster.bary.
        tri: (T, 3) int32 triangle vertex indices, as given to `rasterize`.

    Returns:
        (B, H, W, C), the dtype of attr; zeros where no triangle covers the pixel.
    """
    xp, B, H, W = _check_inputs(attr, raster, tri)
    C = attr.shape[-1]
    if xp is not np:
        import cupy  # noqa: PLC0415

        attr = _as_gpu_input(attr, cupy)
        tri = _as_gpu_input(tri, cupy)
        tri_id = cupy.ascontiguousarray(raster.tri_id)
        bary = _as_gpu_input(raster.bary, cupy)
        out = cupy.empty((B, H, W, C), dtype=cupy.float32)
        grid, block = _grid_2d(H * W, B)
        _gpu_kernel(_channels_name("interpolate_fwd", C))(
            grid, block, (attr, tri_id, bary, tri, np.int32(B), np.int32(attr.shape[-2]), np.int32(tri.shape[0]),
                          np.int32(H), np.int32(W), np.int32(C), np.int32(attr.ndim == 3), out))
        return out
    attr3 = np.ascontiguousarray(attr if attr.ndim == 3 else attr[None])
    out = np.empty((B, H, W, C), attr.dtype)
    interpolate_fwd(attr3, np.ascontiguousarray(raster.tri_id), np.ascontiguousarray(raster.bary),
                    np.ascontiguousarray(tri), out)
    return out


def interpolate_backward(attr, raster, tri, grad_out):
    """Backward of `interpolate`.

    Args:
        attr, raster, tri: as given to `interpolate`.
        grad_out: (B, H, W, C), the gradient of a loss with respect to the interpolated image.

    Returns:
        (grad_attr, grad_bary): grad_attr shaped like attr (summed over the batch when attr is
        (V, C)); grad_bary (B, H, W, 2), zero where the pixel is empty.
    """
    xp, B, H, W = _check_inputs(attr, raster, tri)
    C = attr.shape[-1]
    _check_array("grad_out", grad_out, attr.dtype, (B, H, W, C))
    _checks.check_finite("grad_out", grad_out)
    V = attr.shape[-2]
    if xp is not np:
        import cupy  # noqa: PLC0415

        attr = _as_gpu_input(attr, cupy)
        tri = _as_gpu_input(tri, cupy)
        tri_id = cupy.ascontiguousarray(raster.tri_id)
        bary = _as_gpu_input(raster.bary, cupy)
        grad_out = _as_gpu_input(grad_out, cupy)
        # 3 or 4 channels accumulate in a (..., V, 4) buffer, one float4 atomic per vertex and
        # pixel; 3 channels are then copied out of it.
        grad_attr = cupy.zeros(attr.shape[:-1] + (4,) if C in (3, 4) else attr.shape, dtype=cupy.float32)
        grad_bary = cupy.empty((B, H, W, 2), dtype=cupy.float32)
        grid, block = _grid_2d(H * W, B)
        _gpu_kernel(_channels_name("interpolate_bwd", C))(
            grid, block, (attr, tri_id, bary, tri, grad_out, np.int32(B), np.int32(V), np.int32(tri.shape[0]),
                          np.int32(H), np.int32(W), np.int32(C), np.int32(attr.ndim == 3), grad_attr, grad_bary))
        if C == 3:
            grad_attr = _float4_to_float3(grad_attr, attr.shape)
        return grad_attr, grad_bary
    attr3 = np.ascontiguousarray(attr if attr.ndim == 3 else attr[None])
    n_bands = _n_bands(B, H)
    n_units = B * n_bands
    n_chunks = min(numba.get_num_threads(), n_units)
    per_image_attr = attr3.shape[0] > 1
    grad_attr_part = np.zeros((n_units if per_image_attr else n_chunks, V, C), attr.dtype)
    grad_bary = np.empty((B, H, W, 2), attr.dtype)
    interpolate_bwd(attr3, np.ascontiguousarray(raster.tri_id), np.ascontiguousarray(raster.bary),
                    np.ascontiguousarray(tri), np.ascontiguousarray(grad_out), n_bands, n_chunks, grad_attr_part,
                    grad_bary)
    if per_image_attr:
        grad_attr = grad_attr_part.reshape(B, n_bands, V, C).sum(1) if n_bands > 1 else grad_attr_part
    else:
        grad_attr = grad_attr_part.sum(0).reshape(attr.shape)
    return grad_attr, grad_bary
