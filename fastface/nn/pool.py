"""Global average pooling over H and W (NHWC), forward and backward, on the CPU and the GPU.

    y[b, c] = mean over (h, w) of a[b, h, w, c],   a = relu?(x + in_bias)

The optional prologue is the producer's bias and ReLU (see fastface/nn/conv.py): the encoder's
last convolution leaves its output without bias and this op adds it. Backward:
    grad_x[b, h, w, c] = grad_y[b, c] / (H W) * [x + in_bias > 0 where the ReLU is on]
"""
import numba
import numpy as np

from fastface._backend import KernelFile, array_module, grid_1d, pointer_or_null
from fastface._checks import check_array, check_finite

__all__ = ["global_avg_pool", "global_avg_pool_backward"]


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/nn_pool.cu, same argument order)

@numba.njit(cache=True)
def global_avg_pool_fwd(x, in_bias, in_relu, B, HW, C, ld, out):
    """One iteration per image; x: (B*HW*C,) flat, out: (B*ld,) flat, columns C.. untouched."""
    for b in range(B):
        for c in range(C):
            acc = 0.0
            for i in range(HW):
                a = x[(b * HW + i) * C + c] + in_bias[c]
                if in_relu and not a > 0.0:
                    a = 0.0
                acc += a
            out[b * ld + c] = acc / HW


@numba.njit(cache=True)
def global_avg_pool_bwd(x, in_bias, in_relu, grad_out, B, HW, C, ld, scale, grad_x):
    """One iteration per image; grad_out: (B*ld,) flat, grad_x: (B*HW*C,) flat."""
    for b in range(B):
        for i in range(HW):
            for c in range(C):
                t = (b * HW + i) * C + c
                g = grad_out[b * ld + c] * (scale / HW)
                if in_relu and not x[t] + in_bias[c] > 0.0:
                    g = 0.0
                grad_x[t] = g


# ---------------------------------------------------------------------------------------------
# Dispatch

def _ctype(dtype):
    return {np.dtype(np.float16): "__half", np.dtype(np.float32): "float"}[np.dtype(dtype)]


_GPU_VARIANTS = (
    "global_avg_pool_fwd<float, float>", "global_avg_pool_fwd<__half, __half>",
    "global_avg_pool_bwd<float, float, float>", "global_avg_pool_bwd<__half, __half, __half>",
)


_function = KernelFile("nn_pool.cu", _GPU_VARIANTS)


def _pool_fwd(xp, x, in_bias, in_relu, out):
    """out[:, :C] of a (B, ld) buffer; no checks (the encoder's hot path)."""
    B, H, W, C = x.shape
    ld = out.shape[1]
    if xp is np:
        bias = in_bias if in_bias is not None else np.zeros(C, dtype=out.dtype)
        global_avg_pool_fwd(x.reshape(-1), bias, bool(in_relu), B, H * W, C, ld, out.reshape(-1))
        return out
    kern = _function(f"global_avg_pool_fwd<{_ctype(x.dtype)}, {_ctype(out.dtype)}>")
    grid, block = grid_1d(B * C)
    kern(grid, block, (x, pointer_or_null(in_bias), np.int32(bool(in_relu)), np.int32(B), np.int32(H * W), np.int32(C),
                       np.int32(ld), out))
    return out


def _pool_bwd(xp, x, in_bias, in_relu, grad_out, scale, out):
    """grad of x from grad_out[:, :C] of a (B, ld) buffer; no checks (the encoder's hot path)."""
    B, H, W, C = x.shape
    ld = grad_out.shape[1]
    if xp is np:
        bias = in_bias if in_bias is not None else np.zeros(C, dtype=out.dtype)
        global_avg_pool_bwd(x.reshape(-1), bias, bool(in_relu), grad_out.reshape(-1), B, H * W, C, ld,
                            out.dtype.type(scale), out.reshape(-1))
        return out
    kern = _function(
        f"global_avg_pool_bwd<{_ctype(x.dtype)}, {_ctype(grad_out.dtype)}, {_ctype(out.dtype)}>")
    grid, block = grid_1d(x.size)
    kern(grid, block, (x, pointer_or_null(in_bias), np.int32(bool(in_relu)), grad_out, np.int32(B), np.int32(H * W),
                       np.int32(C), np.int32(ld), np.float32(scale), out))
    return out


def _check(x, in_bias, grad_out=None):
    xp = array_module(("x", x), ("in_bias", in_bias), ("grad_out", grad_out))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    try:
        check_array("x", x, dtypes, ("B", "H", "W", "C"))
    except TypeError as e:
        raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None
    if in_bias is not None:
        check_array("in_bias", in_bias, x.dtype, (x.shape[3],))
    if grad_out is not None:
        check_array("grad_out", grad_out, x.dtype, (x.shape[0], x.shape[3]))
        check_finite("grad_out", grad_out)
    check_finite("x", x)
    return xp


def global_avg_pool(x, in_bias=None, in_relu=False):
    """Mean over H and W of relu?(x + in_bias).

    Args:
        x: (B, H, W, C) float32 (float64 too on the CPU), numpy or cupy.
        in_bias: (C,) of x's dtype, or None.
        in_relu: apply max(., 0) after the bias.

    Returns:
        (B, C) of x's dtype.
    """
    xp = _check(x, in_bias)
    x = xp.ascontiguousarray(x)
    return _pool_fwd(xp, x, in_bias, in_relu, xp.empty((x.shape[0], x.shape[3]), dtype=x.dtype))


def global_avg_pool_backward(x, in_bias, grad_out, in_relu=False):
    """Gradient of `global_avg_pool` with respect to x.

    Args:
        x, in_bias, in_relu: as given to `global_avg_pool`.
        grad_out: (B, C), the gradient of the output.

    Returns:
        (B, H, W, C) gradient of x (the gradient of in_bias is its sum over B, H, W).
    """
    xp = _check(x, in_bias, grad_out)
    x = xp.ascontiguousarray(x)
    return _pool_bwd(xp, x, in_bias, in_relu, xp.ascontiguousarray(grad_out), 1.0, xp.empty_like(x))
