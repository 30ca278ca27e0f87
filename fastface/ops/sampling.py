"""Bilinear sampling of images at pixel coordinates, forward and backward (for per-vertex
photometric losses, as in MoFA).

Coordinates are pixel coordinates (docs/conventions.md): x = column, y = row, and integer values hit pixel
centres exactly, so sampling at (x=j, y=i) returns image[i, j]. Between centres the four nearest
pixels are blended bilinearly.

Outside the image the taps are clamped to the border (OpenGL's CLAMP_TO_EDGE): a point left of
column 0 reads column 0, and so on. There the value does not change with the point, so its
gradient with respect to the point is zero, while the image's border pixels still receive the
gradient. `sample_image_mask` tells which points needed no clamping (0 <= x <= W-1 and
0 <= y <= H-1) so a loss can leave the others out.

Gradient with respect to the points: the derivative of the bilinear blend in the cell
[floor(x), floor(x) + 1]. At an exact integer coordinate this is the one-sided derivative from the
right (the cell starting at that pixel); finite-difference tests use non-integer points.

The image gradient scatters each point's four weights: on the CPU one worker per image (no
races); on the GPU with atomicAdd, whose summation order (and so the last bits) varies.
"""
import numba
import numpy as np

from fastface._backend import KernelFile, array_module, grid_1d
from fastface._checks import check_array, check_finite, check_resolution

__all__ = ["sample_image", "sample_image_backward", "sample_image_mask"]


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/sampling.cu, same argument order)

@numba.njit(cache=True)
def _taps(x, size):
    """(first tap, second tap, weight of the second) along one axis, taps clamped to [0, size-1].

    The coordinate is first clamped to [-1, size] (NaN to -1) so that the integer conversion is
    safe whatever the value; within that range the clamped taps give the same blend as clamping
    the taps of the raw coordinate."""
    if not x >= -1.0:
        x = -1.0
    if x > size:
        x = float(size)
    x0 = np.floor(x)
    t = x - x0
    i0 = int(x0)
    i1 = i0 + 1
    i0 = min(max(i0, 0), size - 1)
    i1 = min(max(i1, 0), size - 1)
    return i0, i1, t


@numba.njit(cache=True, parallel=True)
def sample_image_fwd(image, points, out):
    """One iteration per (batch, point): the bilinear blend of four clamped taps, every channel."""
    B, H, W, C = image.shape
    N = points.shape[1]
    for i in numba.prange(B * N):
        b, n = i // N, i % N
        j0, j1, tx = _taps(points[b, n, 0], W)
        i0, i1, ty = _taps(points[b, n, 1], H)
        for c in range(C):
            top = (1.0 - tx) * image[b, i0, j0, c] + tx * image[b, i0, j1, c]
            bottom = (1.0 - tx) * image[b, i1, j0, c] + tx * image[b, i1, j1, c]
            out[b, n, c] = (1.0 - ty) * top + ty * bottom


@numba.njit(cache=True, parallel=True)
def sample_image_bwd(image, points, grad_out, grad_image, grad_points):
    """grad_points per (batch, point) in parallel; grad_image scattered by one worker per image."""
    B, H, W, C = image.shape
    N = points.shape[1]
    for i in numba.prange(B * N):
        b, n = i // N, i % N
        j0, j1, tx = _taps(points[b, n, 0], W)
        i0, i1, ty = _taps(points[b, n, 1], H)
        gx, gy = 0.0, 0.0
        for c in range(C):
            g = grad_out[b, n, c]
            v00, v01 = image[b, i0, j0, c], image[b, i0, j1, c]
            v10, v11 = image[b, i1, j0, c], image[b, i1, j1, c]
            gx += g * ((1.0 - ty) * (v01 - v00) + ty * (v11 - v10))
            gy += g * ((1.0 - tx) * (v10 - v00) + tx * (v11 - v01))
        grad_points[b, n, 0] = gx
        grad_points[b, n, 1] = gy
    grad_image[:] = 0.0
    for b in numba.prange(B):
        for n in range(N):
            j0, j1, tx = _taps(points[b, n, 0], W)
            i0, i1, ty = _taps(points[b, n, 1], H)
            for c in range(C):
                g = grad_out[b, n, c]
                grad_image[b, i0, j0, c] += (1.0 - ty) * (1.0 - tx) * g
                grad_image[b, i0, j1, c] += (1.0 - ty) * tx * g
                grad_image[b, i1, j0, c] += ty * (1.0 - tx) * g
                grad_image[b, i1, j1, c] += ty * tx * g


# ---------------------------------------------------------------------------------------------
# Dispatch

_kernel = KernelFile("sampling.cu", ("sample_image_fwd", "sample_image_bwd"))


def _prepare(image, points, grad_out=None, backward=False):
    xp = array_module(("image", image), ("points", points), ("grad_out", grad_out))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    try:
        batched = check_array("image", image, dtypes, ("B", "H", "W", "C"), ("H", "W", "C")) == 0
    except TypeError as e:
        raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None
    if batched:
        check_array("points", points, image.dtype, (image.shape[0], "N", 2))
    else:
        check_array("points", points, image.dtype, ("N", 2))
    check_finite("image", image)
    check_finite("points", points)
    c = xp.ascontiguousarray
    g = None
    if backward:  # a None grad_out fails here with a TypeError naming it
        check_array("grad_out", grad_out, image.dtype, tuple(points.shape[:-1]) + (image.shape[-1],))
        check_finite("grad_out", grad_out)
        g = c(grad_out if batched else grad_out[None])
    return xp, batched, c(image if batched else image[None]), c(points if batched else points[None]), g


def sample_image(image, points):
    """Bilinear samples of `image` at pixel coordinates, taps clamped to the border.

    Args:
        image: (B, H, W, C) or (H, W, C) float32 (float64 also on the CPU), numpy or cupy.
        points: (B, N, 2) (or (N, 2) for an unbatched image) pixel coordinates (x = column,
            y = row; integers hit pixel centres), the dtype of image.

    Returns:
        (B, N, C) (or (N, C)) samples.
    """
    xp, batched, im, pts, _ = _prepare(image, points)
    B, H, W, C = im.shape
    N = pts.shape[1]
    out = xp.empty((B, N, C), dtype=im.dtype)
    if xp is np:
        sample_image_fwd(im, pts, out)
    else:
        _kernel("sample_image_fwd")(
            *grid_1d(B * N), (im, pts, out, np.int32(B), np.int32(H), np.int32(W), np.int32(C), np.int32(N)))
    return out if batched else out[0]


def sample_image_backward(image, points, grad_out):
    """Gradients of `sample_image`.

    Args:
        image, points: as for `sample_image`.
        grad_out: (B, N, C) (or (N, C)) gradient of the samples.

    Returns:
        (grad_image, grad_points) shaped like image and points. grad_points is zero along an axis
        where the point lies outside [0, W-1] (or [0, H-1]), and one-sided from the right at exact
        integer coordinates.
    """
    xp, batched, im, pts, g = _prepare(image, points, grad_out, backward=True)
    B, H, W, C = im.shape
    N = pts.shape[1]
    grad_points = xp.empty_like(pts)
    if xp is np:
        grad_image = np.empty_like(im)
        sample_image_bwd(im, pts, g, grad_image, grad_points)
    else:
        grad_image = xp.zeros_like(im)
        _kernel("sample_image_bwd")(
            *grid_1d(B * N), (im, pts, g, grad_image, grad_points, np.int32(B), np.int32(H), np.int32(W),
                              np.int32(C), np.int32(N)))
    return (grad_image, grad_points) if batched else (grad_image[0], grad_points[0])


def sample_image_mask(points, resolution):
    """True where `sample_image` needed no clamping: 0 <= x <= W-1 and 0 <= y <= H-1.

    Args:
        points: (..., 2) pixel coordinates, numpy or cupy.
        resolution: (H, W) of the sampled image.

    Returns:
        (...) bool array on the device of points (False for NaN coordinates).
    """
    array_module(("points", points))
    check_array("points", points, (np.float32, np.float64), ("B", "N", 2), ("N", 2))
    height, width = check_resolution("resolution", resolution)
    x, y = points[..., 0], points[..., 1]
    return (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
