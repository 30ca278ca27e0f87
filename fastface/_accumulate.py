"""The write-or-add of a per-vertex gradient that the Numba twins of the `add_to=` backwards share.

A backward given `add_to=` adds its gradient into the caller's array instead of writing a new one (the
training step sums several gradients of one field that way, without a full-size add each); its CUDA
kernel takes an `accumulate` flag, and its Numba twin the same flag and this helper.
"""
import numba

__all__ = ["store3"]


@numba.njit(cache=True, inline="always")
def store3(grad, b, v, x, y, z, accumulate):
    """grad[b, v] = (x, y, z), or += when accumulate."""
    if accumulate:
        grad[b, v, 0] += x
        grad[b, v, 1] += y
        grad[b, v, 2] += z
    else:
        grad[b, v, 0] = x
        grad[b, v, 1] = y
        grad[b, v, 2] = z
