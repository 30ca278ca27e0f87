"""The training losses that know nothing of faces: robust masked photometric l2,1, weighted 2D
point distance and the quadratic prior, each a forward and a backward side by side.

Every loss returns one value per image, (B,), in the inputs' float dtype and on their device (no
host synchronisation on the GPU), and every backward takes `grad_out` (B,), the weight of each
image's value in the scalar being differentiated, last (before the keyword-only `out`: every loss
and backward can write into a buffer the caller owns, so that a step recorded in a CUDA graph
allocates no outputs; the GPU photometric loss still takes a small scratch buffer, see Determinism).
A training step sums
`weight * loss(...).sum()` (or a mean) on its side and passes `grad_out = weight * ones(B)`.

Photometric (robust l2,1, as in MoFA / Tewari et al. 2018): for image b,

    L_b = sum_p m_p * (sqrt(|r_p - t_p|^2 + eps^2) - eps) / max(1, sum_p m_p)

with r_p, t_p the rendered and target colours of pixel p and m_p its mask weight (a bool mask is
0/1). Each pixel adds its colour DISTANCE, not its squared distance (the l2,1 norm: robust to
outliers such as occluders), smoothed at 0 by eps = PHOTOMETRIC_EPS so the gradient is defined
everywhere: sqrt(d^2 + eps^2) - eps equals d - eps + O(eps^2 / d) for d >> eps and d^2 / (2 eps)
near 0, so it is 0 at d = 0 and differs from the plain distance by less than eps. The mask sum is
a constant of the loss (no gradient flows into it), and max(1, .) makes an empty mask give 0 (and a
zero gradient) instead of 0/0; a float mask summing to less than 1 is not scaled up.
Gradient: dL_b/dr_p = m_p (r_p - t_p) / sqrt(|r_p - t_p|^2 + eps^2) / max(1, sum m).

Landmarks: L_b = sum_k w_k |p_k - t_k|^2 / K (squared pixel distance, weights (K,) or (B, K)).
Gradient with respect to the points only: 2 w_k (p_k - t_k) / K.

Prior: L_b = sum_k w_k c_k^2 (weights (K,), or None for ones). Gradient: 2 w_k c_k.

Determinism: every value is summed in a fixed order on both devices, an order fixed by the sizes
alone (never by the number of threads or the GPU). On the CPU the photometric sums run in parallel
over fixed bands of _BAND pixels (not over threads), each band summed in float64, then the bands in
order. On the GPU (kernels/losses.cu, whose top comment gives the design in bytes and blocks) the
photometric forward is two passes: blocks of _GPU_CHUNK pixels write float64 partial sums of the loss
and the mask into a scratch buffer, then one warp per image adds its partials in a fixed order. The
backward first sums each image's mask in a pass of its own that reads only the mask (the forward's
sum cannot reach it through this API; at most 32 float64 partial sums an image), then writes the
gradient. The landmark and prior forwards sum with one warp per image (lanes over k, then a fixed
shuffle tree), in another order than the twins' k order: GPU and CPU agree within float32 rounding,
and each is bit-reproducible. No atomics anywhere. The GPU photometric loss allocates a scratch buffer
besides its outputs, from cupy's memory pool (which serves it inside a CUDA-graph capture too):
B * ceil(H W / _GPU_CHUNK) * 16 bytes forward, B * min(32, ceil(H W / _GPU_COUNT_CHUNK)) * 8 backward
(50 KB and 3.6 KB at B = 64, 224 x 224).
"""
import numba
import numpy as np

from fastface._backend import KernelFile, NULL_POINTER, array_module, grid_1d, is_cupy_array
from fastface._checks import (check_array, check_finite, check_float, float_dtypes, queue_on_device,
                              value_checks_enabled)

__all__ = ["PHOTOMETRIC_EPS", "photometric_loss", "photometric_loss_backward", "landmark_loss",
           "landmark_loss_backward", "prior_loss", "prior_loss_backward"]

# The smoothing of the per-pixel distance at 0, in colour units (colours in [0, 1]): a quarter of
# an 8-bit grey level, so the loss differs from the plain l2,1 norm by less than that per pixel.
# A pixel's gradient has norm d / sqrt(d^2 + eps^2) < 1 (times m / mask sum) and its curvature is at
# most 1 / eps, which float32 holds easily; eps^2 = 1e-6 is far above float32's underflow.
PHOTOMETRIC_EPS = 1e-3

_BAND = 4096              # pixels per parallel work item of the CPU photometric kernels
# The constants of kernels/losses.cu (tests/ops/test_losses.py checks that they agree).
_GPU_THREADS = 256        # PHOTOMETRIC_THREADS: threads per block of the photometric kernels
_GPU_CHUNK = 1024         # PHOTOMETRIC_CHUNK: pixels per block of the forward's partial sums and the gradient
_GPU_COUNT_CHUNK = 8192   # PHOTOMETRIC_COUNT_CHUNK: pixels per block of the backward's mask sums ...
_GPU_MAX_COUNT_BLOCKS = 32  # PHOTOMETRIC_MAX_COUNT_BLOCKS: ... in at most this many blocks an image
_GPU_WARPS = 8            # WARPS_PER_BLOCK: images (a warp each) per block of the per-image sums


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/losses.cu, same names and argument order)
# rendered, target (B, HW, C); mask (B, HW) bool or float; out (B,).
# error_model="numpy": no zero-divisor check per division, which can keep LLVM from vectorising a
# loop (none can be zero here: sqrt(d^2 + eps^2) >= eps and max(1, .) >= 1). It measured no
# difference on these loops (the 3-channel inner loops stay scalar).

@numba.njit(cache=True, parallel=True, error_model="numpy")
def photometric_loss_fwd(rendered, target, mask, out, eps):
    """Per (image, band of _BAND pixels) in parallel: float64 sums of the robust distance and of the
    mask; then per image the bands in order."""
    B, HW, C = rendered.shape
    n_bands = (HW + _BAND - 1) // _BAND
    partial = np.empty((B, n_bands, 2))
    for job in numba.prange(B * n_bands):
        b, band = job // n_bands, job % n_bands
        loss, weight = 0.0, 0.0
        for p in range(band * _BAND, min(HW, (band + 1) * _BAND)):
            m = rendered.dtype.type(mask[b, p])
            if m == 0:
                continue
            d2 = rendered.dtype.type(0)
            for c in range(C):
                d = rendered[b, p, c] - target[b, p, c]
                d2 += d * d
            loss += m * (np.sqrt(d2 + eps * eps) - eps)
            weight += m
        partial[b, band, 0] = loss
        partial[b, band, 1] = weight
    for b in range(B):
        loss, weight = 0.0, 0.0
        for band in range(n_bands):
            loss += partial[b, band, 0]
            weight += partial[b, band, 1]
        out[b] = loss / max(1.0, weight)


@numba.njit(cache=True, parallel=True, error_model="numpy")
def photometric_loss_bwd(rendered, target, mask, grad_out, grad_rendered, eps):
    """Per image the mask sum (float64, in order); then per (image, band) in parallel the gradient."""
    B, HW, C = rendered.shape
    n_bands = (HW + _BAND - 1) // _BAND
    scale = np.empty(B, dtype=rendered.dtype)
    for b in numba.prange(B):
        weight = 0.0
        for p in range(HW):
            weight += mask[b, p]
        scale[b] = grad_out[b] / max(1.0, weight)
    for job in numba.prange(B * n_bands):
        b, band = job // n_bands, job % n_bands
        for p in range(band * _BAND, min(HW, (band + 1) * _BAND)):
            m = rendered.dtype.type(mask[b, p])
            if m == 0:
                for c in range(C):
                    grad_rendered[b, p, c] = 0
                continue
            d2 = rendered.dtype.type(0)
            for c in range(C):
                d = rendered[b, p, c] - target[b, p, c]
                d2 += d * d
            k = scale[b] * m / np.sqrt(d2 + eps * eps)
            for c in range(C):
                grad_rendered[b, p, c] = k * (rendered[b, p, c] - target[b, p, c])


# The small losses: B x K work (64 x 68 landmarks, 64 x 80 coefficients), sequential (a parallel
# region costs more than the work), summed in the input's dtype in k order (the GPU sums lanes k mod 32,
# then a shuffle tree: the same terms in another fixed order).

@numba.njit(cache=True)
def landmark_loss_fwd(points, target, weights, out):
    """weights (B or 1, K): row 0 for every image when it has one row."""
    B, K = points.shape[0], points.shape[1]
    w_rows = weights.shape[0]
    for b in range(B):
        wb = weights[b if w_rows > 1 else 0]
        acc = points.dtype.type(0)
        for k in range(K):
            dx = points[b, k, 0] - target[b, k, 0]
            dy = points[b, k, 1] - target[b, k, 1]
            acc += wb[k] * (dx * dx + dy * dy)
        out[b] = acc / points.dtype.type(K)


@numba.njit(cache=True)
def landmark_loss_bwd(points, target, weights, grad_out, grad_points):
    B, K = points.shape[0], points.shape[1]
    w_rows = weights.shape[0]
    for b in range(B):
        wb = weights[b if w_rows > 1 else 0]
        for k in range(K):
            s = points.dtype.type(2) * grad_out[b] * wb[k] / points.dtype.type(K)
            grad_points[b, k, 0] = s * (points[b, k, 0] - target[b, k, 0])
            grad_points[b, k, 1] = s * (points[b, k, 1] - target[b, k, 1])


@numba.njit(cache=True)
def prior_loss_fwd(coeffs, weights, out):
    """weights (K,); the dispatch passes ones for None."""
    B, K = coeffs.shape
    for b in range(B):
        acc = coeffs.dtype.type(0)
        for k in range(K):
            acc += weights[k] * coeffs[b, k] * coeffs[b, k]
        out[b] = acc


@numba.njit(cache=True)
def prior_loss_bwd(coeffs, weights, grad_out, grad_coeffs):
    B, K = coeffs.shape
    for b in range(B):
        for k in range(K):
            grad_coeffs[b, k] = coeffs.dtype.type(2) * grad_out[b] * weights[k] * coeffs[b, k]


# ---------------------------------------------------------------------------------------------
# Dispatch

# The photometric kernels' template instances: <mask load, colour load>, one pixel a thread (any C, any
# H * W) or a quad of 4 pixels (C = 3, H * W a multiple of 4: 16-byte loads; see _photometric_gpu_inputs).
_PHOTOMETRIC_LOADS = ("unsigned char, float", "float, float", "unsigned int, float4", "float4, float4")
_KERNELS = KernelFile("losses.cu", (
    *(f"photometric_loss_fwd<{t}>" for t in _PHOTOMETRIC_LOADS), "photometric_loss_fwd_sum",
    *(f"photometric_loss_bwd_count<{t.split(',')[0]}>" for t in _PHOTOMETRIC_LOADS),
    *(f"photometric_loss_bwd<{t}>" for t in _PHOTOMETRIC_LOADS),
    "landmark_loss_fwd", "landmark_loss_bwd", "prior_loss_fwd", "prior_loss_bwd"))


_float_dtypes = float_dtypes  # fastface/_checks.py, shared by the ops
_check_float = check_float


def _check_range(name, a, lo, hi, what):
    """ValueError when `a` holds values outside [lo, hi] or NaN (on the GPU, later: fastface/_checks.py)."""
    if not value_checks_enabled():
        return
    if queue_on_device(a, lo, hi, "{} {} {} holds values that are not " + what, name, a.dtype, a.shape):
        return
    if a.size and not (bool((a >= lo).all()) and bool((a <= hi).all())):  # NaN fails both
        raise ValueError(f"{name} holds values that are not {what}")


def _output(xp, out, dtype, shape):
    """A new output array, or the caller's `out` once checked (same device, dtype, shape, C-contiguous):
    a training step that records a CUDA graph passes buffers it owns, so that the step allocates no outputs."""
    if out is None:
        return xp.empty(shape, dtype=dtype)
    device = "numpy" if xp is np else "cupy"
    if not hasattr(out, "flags") or is_cupy_array(out) != (xp is not np):
        raise TypeError(f"out must be a {device} array like the inputs; got {type(out).__name__}")
    check_array("out", out, dtype, shape)
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous (the kernels write it in place)")
    return out


def _check_grad_out(grad_out, dtype, batch):
    check_array("grad_out", grad_out, dtype, (batch,))
    check_finite("grad_out", grad_out)


def _prepare_photometric(rendered, target, mask, grad_out=None, backward=False):
    xp = array_module(("rendered", rendered), ("target", target), ("mask", mask), ("grad_out", grad_out))
    _check_float(xp, "rendered", rendered, ("B", "H", "W", "C"))
    B, H, W, C = rendered.shape
    if H * W > 2**31 - 1:
        raise ValueError(f"rendered must have fewer than 2^31 pixels per image; got {H} x {W}")
    check_array("target", target, rendered.dtype, tuple(rendered.shape))
    check_array("mask", mask, (np.bool_, rendered.dtype), (B, H, W))
    if backward:  # a None grad_out fails here with a TypeError naming it
        _check_grad_out(grad_out, rendered.dtype, B)
    check_finite("rendered", rendered)
    check_finite("target", target)
    if mask.dtype != np.bool_:
        _check_range("mask", mask, 0.0, 1.0, "weights in [0, 1]")
    c = xp.ascontiguousarray
    r = c(rendered).reshape(B, H * W, C)
    t = c(target).reshape(B, H * W, C)
    m = c(mask).reshape(B, H * W)
    return xp, r, t, m, (None if grad_out is None else c(grad_out))


def _warp_per_image_grid(B):
    """(grid, block) of the kernels that give each of B images one warp, _GPU_WARPS images a block."""
    return ((B + _GPU_WARPS - 1) // _GPU_WARPS,), (32 * _GPU_WARPS,)


def _aligned(a, alignment):
    """a itself when its address is a multiple of `alignment` bytes, else a copy (cupy's pool aligns to 256)."""
    return a if a.data.ptr % alignment == 0 else a.copy()


def _photometric_gpu_inputs(r, t, m):
    """(template arguments, rendered, target, mask) for the photometric kernels on the GPU.

    With C = 3 and H * W a multiple of 4 (every image then starts on a 16-byte boundary) the kernels read
    quads of 4 pixels: float4 colours (16-byte aligned: a misaligned input is copied, so that the summation
    order, hence the result's bits, depends on the shapes alone) and the mask 4 values a load (a bool mask
    as unsigned int, 4-byte aligned; float weights as float4). Otherwise one pixel a thread.
    """
    B, HW, C = r.shape
    is_bool = m.dtype == np.bool_
    if C == 3 and HW % 4 == 0:
        r, t = _aligned(r, 16), _aligned(t, 16)
        if is_bool:
            return "unsigned int, float4", r, t, _aligned(m, 4).reshape(-1).view(np.uint32)
        return "float4, float4", r, t, _aligned(m, 16)
    return ("unsigned char, float", r, t, m.view(np.uint8)) if is_bool else ("float, float", r, t, m)


def photometric_loss(rendered, target, mask, *, out=None):
    """Robust masked l2,1 photometric loss per image (see the module docstring for the formula).

    Args:
        rendered: (B, H, W, C) float32 (float64 also on the CPU), numpy or cupy; C = 3 for RGB.
        target: (B, H, W, C), the dtype of rendered: the images to match.
        mask: (B, H, W) bool, or float weights in [0, 1] of rendered's dtype: the pixels that count
            (usually those the rendered face covers).
        out: optional (B,) C-contiguous array of rendered's dtype and device to write the result to.

    Returns:
        (B,) of rendered's dtype (`out` when given): sum_p m_p (sqrt(|r_p - t_p|^2 + PHOTOMETRIC_EPS^2) -
        PHOTOMETRIC_EPS) / max(1, sum_p m_p); 0 for an empty mask.
    """
    xp, r, t, m, _ = _prepare_photometric(rendered, target, mask)
    B, HW, C = r.shape
    out = _output(xp, out, r.dtype, (B,))
    if xp is np:
        photometric_loss_fwd(r, t, m, out, r.dtype.type(PHOTOMETRIC_EPS))
    else:
        loads, r, t, m = _photometric_gpu_inputs(r, t, m)
        n_chunks = (HW + _GPU_CHUNK - 1) // _GPU_CHUNK
        partial = xp.empty((B * n_chunks, 2), dtype=np.float64)  # (loss, mask) sums of each block
        _KERNELS(f"photometric_loss_fwd<{loads}>")((B * n_chunks,), (_GPU_THREADS,), (
            r, t, m, partial, np.int32(HW), np.int32(C), np.float32(PHOTOMETRIC_EPS), np.int32(n_chunks)))
        _KERNELS("photometric_loss_fwd_sum")(*_warp_per_image_grid(B), (
            partial, out, np.int32(B), np.int32(n_chunks)))
    return out


def photometric_loss_backward(rendered, target, mask, grad_out, *, out=None):
    """Gradient of `photometric_loss` with respect to `rendered` (the mask sum held constant).

    Args:
        rendered, target, mask: as for `photometric_loss`.
        grad_out: (B,) of rendered's dtype, the weight of each image's loss.
        out: optional (B, H, W, C) C-contiguous array like rendered to write the gradient to.

    Returns:
        grad_rendered (B, H, W, C) (`out` when given): grad_out[b] m_p (r_p - t_p) / sqrt(|r_p - t_p|^2 + eps^2) /
        max(1, sum m); zero where the mask is 0.
    """
    xp, r, t, m, g = _prepare_photometric(rendered, target, mask, grad_out, backward=True)
    B, HW, C = r.shape
    result = _output(xp, out, r.dtype, tuple(rendered.shape))
    grad = result.reshape(r.shape)  # a view: result is C-contiguous
    if xp is np:
        photometric_loss_bwd(r, t, m, g, grad, r.dtype.type(PHOTOMETRIC_EPS))
    else:
        loads, r, t, m = _photometric_gpu_inputs(r, t, m)
        # The kernels' float4 stores need a 16-byte aligned gradient: a misaligned `out` gets a copy.
        aligned_grad = grad if "float4" not in loads or grad.data.ptr % 16 == 0 else xp.empty_like(grad)
        n_count = min(_GPU_MAX_COUNT_BLOCKS, (HW + _GPU_COUNT_CHUNK - 1) // _GPU_COUNT_CHUNK)
        count = xp.empty(B * n_count, dtype=np.float64)  # mask sums of each counting block
        _KERNELS(f"photometric_loss_bwd_count<{loads.split(',')[0]}>")((B * n_count,), (_GPU_THREADS,), (
            m, count, np.int32(HW), np.int32(n_count)))
        n_chunks = (HW + _GPU_CHUNK - 1) // _GPU_CHUNK
        _KERNELS(f"photometric_loss_bwd<{loads}>")((B * n_chunks,), (_GPU_THREADS,), (
            r, t, m, count, g, aligned_grad, np.int32(HW), np.int32(C), np.float32(PHOTOMETRIC_EPS),
            np.int32(n_chunks), np.int32(n_count)))
        if aligned_grad is not grad:
            grad[...] = aligned_grad
    return result


def _prepare_landmarks(points, target, weights, grad_out=None, backward=False):
    xp = array_module(("points", points), ("target", target), ("weights", weights), ("grad_out", grad_out))
    _check_float(xp, "points", points, ("B", "K", 2))
    B, K = points.shape[0], points.shape[1]
    check_array("target", target, points.dtype, (B, K, 2))
    per_image = check_array("weights", weights, points.dtype, (K,), (B, K)) == 1
    if backward:
        _check_grad_out(grad_out, points.dtype, B)
    check_finite("points", points)
    check_finite("target", target)
    _check_range("weights", weights, 0.0, float(np.finfo(weights.dtype).max), "finite and >= 0")
    c = xp.ascontiguousarray
    w = c(weights if per_image else weights[None])
    return xp, c(points), c(target), w, (None if grad_out is None else c(grad_out))


def landmark_loss(points, target, weights, *, out=None):
    """Weighted squared 2D distance per image: sum_k w_k |p_k - t_k|^2 / K.

    Args:
        points: (B, K, 2) float32 (float64 also on the CPU) pixel coordinates, numpy or cupy.
        target: (B, K, 2) of points' dtype.
        weights: (K,) (the same for every image) or (B, K), >= 0, of points' dtype.
        out: optional (B,) C-contiguous array of points' dtype and device to write the result to.

    Returns:
        (B,) of points' dtype (`out` when given).
    """
    xp, p, t, w, _ = _prepare_landmarks(points, target, weights)
    B, K = p.shape[0], p.shape[1]
    out = _output(xp, out, p.dtype, (B,))
    if xp is np:
        landmark_loss_fwd(p, t, w, out)
    else:
        _KERNELS("landmark_loss_fwd")(*_warp_per_image_grid(B), (
            p, t, w, out, np.int32(B), np.int32(K), np.int32(K if w.shape[0] > 1 else 0)))
    return out


def landmark_loss_backward(points, target, weights, grad_out, *, out=None):
    """Gradient of `landmark_loss` with respect to `points` (target and weights are constants).

    Args:
        points, target, weights: as for `landmark_loss`.
        grad_out: (B,) of points' dtype.
        out: optional (B, K, 2) C-contiguous array like points to write the gradient to.

    Returns:
        grad_points (B, K, 2) (`out` when given): 2 grad_out[b] w_k (p_k - t_k) / K.
    """
    xp, p, t, w, g = _prepare_landmarks(points, target, weights, grad_out, backward=True)
    B, K = p.shape[0], p.shape[1]
    grad = _output(xp, out, p.dtype, (B, K, 2))
    if xp is np:
        landmark_loss_bwd(p, t, w, g, grad)
    else:
        _KERNELS("landmark_loss_bwd")(*grid_1d(B * K), (
            p, t, w, g, grad, np.int32(B), np.int32(K), np.int32(K if w.shape[0] > 1 else 0)))
    return grad


def _prepare_prior(coeffs, weights, grad_out=None, backward=False):
    xp = array_module(("coeffs", coeffs), ("weights", weights), ("grad_out", grad_out))
    _check_float(xp, "coeffs", coeffs, ("B", "K"))
    B, K = coeffs.shape
    if weights is not None:
        check_array("weights", weights, coeffs.dtype, (K,))
    if backward:
        _check_grad_out(grad_out, coeffs.dtype, B)
    check_finite("coeffs", coeffs)
    if weights is not None:
        _check_range("weights", weights, 0.0, float(np.finfo(weights.dtype).max), "finite and >= 0")
    c = xp.ascontiguousarray
    w = None if weights is None else c(weights)
    if xp is np and w is None:
        w = np.ones(K, dtype=coeffs.dtype)
    return xp, c(coeffs), w, (None if grad_out is None else c(grad_out))


def prior_loss(coeffs, weights=None, *, out=None):
    """Quadratic prior per image: sum_k w_k c_k^2.

    Args:
        coeffs: (B, K) float32 (float64 also on the CPU), numpy or cupy; for a statistical prior the
            coefficients in units of their standard deviations.
        weights: (K,) >= 0 of coeffs' dtype, or None for ones.
        out: optional (B,) C-contiguous array of coeffs' dtype and device to write the result to.

    Returns:
        (B,) of coeffs' dtype (`out` when given).
    """
    xp, c, w, _ = _prepare_prior(coeffs, weights)
    B, K = c.shape
    out = _output(xp, out, c.dtype, (B,))
    if xp is np:
        prior_loss_fwd(c, w, out)
    else:
        _KERNELS("prior_loss_fwd")(*_warp_per_image_grid(B), (
            c, NULL_POINTER if w is None else w, out, np.int32(B), np.int32(K)))
    return out


def prior_loss_backward(coeffs, weights, grad_out, *, out=None):
    """Gradient of `prior_loss` with respect to `coeffs`.

    Args:
        coeffs, weights: as for `prior_loss` (weights may be None).
        grad_out: (B,) of coeffs' dtype.
        out: optional (B, K) C-contiguous array like coeffs to write the gradient to.

    Returns:
        grad_coeffs (B, K) (`out` when given): 2 grad_out[b] w_k c_k.
    """
    xp, c, w, g = _prepare_prior(coeffs, weights, grad_out, backward=True)
    B, K = c.shape
    grad = _output(xp, out, c.dtype, (B, K))
    if xp is np:
        prior_loss_bwd(c, w, g, grad)
    else:
        _KERNELS("prior_loss_bwd")(*grid_1d(B * K), (
            c, NULL_POINTER if w is None else w, g, grad, np.int32(B), np.int32(K)))
    return grad
