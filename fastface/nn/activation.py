"""ReLU and leaky ReLU, forward and backward (elementwise, any shape, numpy or cupy).

    relu(x) = x where x > 0, else negative_slope * x
    grad_x  = grad_out where x > 0, else negative_slope * grad_out

The derivative at exactly 0 is taken as negative_slope (the left one), the same choice as the
fused ReLU of the encoder's kernels. The encoder does not call these: its ReLUs are fused into
the gathers of fastface/nn/conv.py and fastface/nn/pool.py. They are here as the layer on its
own, for other networks and as the reference the fused ones are tested against.
"""
import numpy as np

from fastface._backend import array_module
from fastface._checks import check_array, check_finite

__all__ = ["relu", "relu_backward"]


def _check(x, grad_out, negative_slope):
    xp = array_module(("x", x), ("grad_out", grad_out))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32, np.float16)
    if not (hasattr(x, "dtype") and hasattr(x, "shape")) or x.dtype not in dtypes:
        raise TypeError(f"x must be an array of {' or '.join(str(np.dtype(d)) for d in dtypes)}; got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if grad_out is not None:
        check_array("grad_out", grad_out, x.dtype, tuple(x.shape))
        check_finite("grad_out", grad_out)
    slope = float(negative_slope)
    if not (0.0 <= slope < 1.0):
        raise ValueError(f"negative_slope must be in [0, 1); got {negative_slope!r}")
    check_finite("x", x)
    return xp, slope


def relu(x, negative_slope=0.0):
    """ReLU (negative_slope 0) or leaky ReLU; returns a new array shaped like x."""
    xp, slope = _check(x, None, negative_slope)
    if slope == 0.0:
        return xp.maximum(x, 0)
    return xp.where(x > 0, x, x * x.dtype.type(slope))


def relu_backward(x, grad_out, negative_slope=0.0):
    """Gradient of `relu` with respect to x, given the gradient of its output."""
    xp, slope = _check(x, grad_out, negative_slope)
    return xp.where(x > 0, grad_out, grad_out * x.dtype.type(slope))
