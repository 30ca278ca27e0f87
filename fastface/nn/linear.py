"""Fully connected layer, forward and backward: y = x @ weight + bias (GEMMs on both backends).

Backward (the chain rule):
    grad_x = grad_y @ weight^T,   grad_weight = x^T @ grad_y,   grad_bias = sum over rows of grad_y
"""
import numpy as np

from fastface._backend import array_module
from fastface._checks import check_array, check_finite
from fastface._gemm import gemm

__all__ = ["linear", "linear_backward"]


def _check(x, weight, bias, grad_out):
    xp = array_module(("x", x), ("weight", weight), ("bias", bias), ("grad_out", grad_out))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    try:
        check_array("x", x, dtypes, ("B", "C_in"))
    except TypeError as e:
        raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None
    check_array("weight", weight, x.dtype, (x.shape[1], "C_out"))
    if bias is not None:
        check_array("bias", bias, x.dtype, (weight.shape[1],))
    if grad_out is not None:
        check_array("grad_out", grad_out, x.dtype, (x.shape[0], weight.shape[1]))
        check_finite("grad_out", grad_out)
    check_finite("x", x)
    check_finite("weight", weight)
    return xp


def linear(x, weight, bias=None):
    """y = x @ weight + bias.

    Args:
        x: (B, C_in) float32 (float64 too on the CPU), numpy or cupy.
        weight: (C_in, C_out), x's dtype. bias: (C_out,) or None.

    Returns:
        (B, C_out).
    """
    xp = _check(x, weight, bias, None)
    x, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(weight)
    y = gemm(x, weight, xp.empty((x.shape[0], weight.shape[1]), dtype=x.dtype))
    if bias is not None:
        y += bias
    return y


def linear_backward(x, weight, grad_out):
    """Gradients of `linear`: (grad_x (B, C_in), grad_weight (C_in, C_out), grad_bias (C_out,))."""
    xp = _check(x, weight, None, grad_out)
    x, weight, g = xp.ascontiguousarray(x), xp.ascontiguousarray(weight), xp.ascontiguousarray(grad_out)
    grad_x = gemm(g, weight, xp.empty(x.shape, dtype=x.dtype), trans_b=True)
    grad_weight = gemm(x, g, xp.empty(weight.shape, dtype=x.dtype), trans_a=True)
    grad_bias = g.sum(axis=0)
    return grad_x, grad_weight, grad_bias
