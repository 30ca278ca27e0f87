"""Input checks shared by every public op. They raise ValueError/TypeError naming the argument.

Shape checks and dtype checks are free (they read metadata). Value checks (finite values, index
ranges, points in front of the camera) must read the data. On numpy arrays they run in the call
and raise there. On cupy arrays a verdict read back on the host would be a synchronisation, which
costs more than a small op itself. So by default they run on the GPU, and a failure is raised by a
later fastface call or by `fastface.check_device_errors()` (fastface/_device_checks.py).
`value_checks("sync")` makes the GPU checks wait and raise in the call, as the CPU ones do, and
`value_checks(False)` turns them off for a hot loop that has validated its inputs once. The kernels
never rely on these checks for memory safety: out-of-range indices are skipped inside them.
"""
import contextlib
import threading

import numpy as np

from fastface import _device_checks
from fastface._backend import is_cupy_array

__all__ = [
    "check_array", "check_finite", "check_float", "float_dtypes", "check_indices", "check_resolution", "check_same_batch",
    "value_checks", "value_checks_enabled", "queue_on_device", "describe", "check_accumulator",
]

_state = threading.local()
_MODES = {True: "on", False: "off", "sync": "sync"}
_LARGEST = {np.dtype(t): np.finfo(t).max for t in (np.float16, np.float32, np.float64)}


def _mode():
    return getattr(_state, "mode", "on")


def value_checks_enabled():
    return _mode() != "off"


@contextlib.contextmanager
def value_checks(enabled=True):
    """Sets the data-reading checks (NaN/Inf, index range, points behind the camera) inside the block.

    Args:
        enabled: True (the default outside any block): numpy inputs are checked in the call; cupy
            inputs are checked on the GPU without waiting, and a failure raises at a later fastface
            call or at `fastface.check_device_errors()`. "sync": cupy inputs are checked in the call,
            which waits for the GPU (for debugging: the error comes from the call that got the bad
            input, with counts and ranges). False: no value checks.
    """
    if not (enabled is True or enabled is False or enabled == "sync"):  # 1 and 0 would pass `in _MODES`
        raise ValueError(f"value_checks takes True, False or 'sync'; got {enabled!r}")
    previous = _mode()
    _state.mode = _MODES[enabled]
    try:
        yield
    finally:
        _state.mode = previous


def queue_on_device(a, lo, hi, message, *message_args, offset=0, stride=1, count=None):
    """Queues the check `lo <= x <= hi` (NaN fails) of cupy array `a` on the GPU, when checks are on and not
    "sync". Returns True when queued; False when the caller must check on the host now (a numpy array,
    "sync" mode, or a dtype without a check kernel). `message.format(*message_args)` is the failure's text.
    See fastface/_device_checks.py."""
    if _mode() != "on" or not is_cupy_array(a):
        return False
    return _device_checks.queue_check(a, lo, hi, message, *message_args, offset=offset, stride=stride, count=count)


def describe(a):
    """'float64 (10, 3)' for an array, the type name for anything else."""
    if hasattr(a, "dtype") and hasattr(a, "shape"):
        return f"{a.dtype} {tuple(a.shape)}"
    return type(a).__name__


def _shape_text(pattern):
    return "(" + ", ".join(str(d) for d in pattern) + ")"


def _matches(shape, pattern):
    if len(shape) != len(pattern):
        return False
    return all(isinstance(p, str) or p is None or p == s for s, p in zip(shape, pattern))


def check_array(name, a, dtypes, *patterns):
    """Checks that `a` is an array of one of `dtypes` whose shape fits one of `patterns`.

    A pattern is a tuple of ints (fixed sizes) and strings or None (any size; a string names the
    dimension in messages, such as "B" or "V"). Returns the index of the matching pattern.

        check_array("pos", pos, np.float32, ("B", "V", 4), ("V", 4))

    The messages are only formatted on failure: this runs on every op call, where a few
    microseconds matter on the GPU's batch-of-one path.
    """
    dtypes = dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)
    dtype = getattr(a, "dtype", None)
    shape = getattr(a, "shape", None)
    if dtype is not None and shape is not None and any(dtype == d for d in dtypes):
        for i, pattern in enumerate(patterns):
            if _matches(shape, pattern):
                if 0 in shape and any(s == 0 for s, p in zip(shape, pattern) if not isinstance(p, int)):
                    raise ValueError(f"{name} must not be empty; got shape {tuple(shape)}")
                return i
    expected = " or ".join(_shape_text(p) for p in patterns)
    dtype_text = " or ".join(str(np.dtype(d)) for d in dtypes)
    if dtype is None or shape is None:
        raise TypeError(f"{name} must be a numpy or cupy array of {dtype_text} with shape {expected}; "
                        f"got {type(a).__name__}")
    if not any(dtype == d for d in dtypes):
        raise TypeError(f"{name} must be {dtype_text} with shape {expected}; got {describe(a)}")
    raise ValueError(f"{name} must have shape {expected}; got {describe(a)}")


def check_finite(name, a):
    """Raises ValueError when `a` holds NaN or Inf (on the GPU, later: see the module docstring)."""
    if not value_checks_enabled() or a.dtype.kind in "iub":  # integers and booleans are always finite
        return
    big = _LARGEST.get(a.dtype)
    if big is not None and queue_on_device(a, -big, big, "{} {} {} holds NaN or infinite values",
                                           name, a.dtype, a.shape):
        return
    xp = np if isinstance(a, np.ndarray) else __import__("cupy")
    if not bool(xp.isfinite(a).all()):
        n_bad = int((~xp.isfinite(a)).sum())
        raise ValueError(f"{name} holds {n_bad} NaN or infinite values")


def check_indices(name, idx, n, what="vertex"):
    """Raises ValueError when an index in `idx` is outside [0, n) (on the GPU, later)."""
    if not value_checks_enabled() or idx.size == 0:
        return
    if queue_on_device(idx, 0, n - 1, "{} {} {} holds {} indices outside the valid range [0, {}]",
                       name, idx.dtype, idx.shape, what, n - 1):
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{name} holds {what} indices in [{lo}, {hi}], outside the valid range [0, {n - 1}]")


def check_resolution(name, resolution, max_size=16384):
    """Returns (H, W) as Python ints after checking they are positive integers."""
    try:
        h, w = resolution
        h_int, w_int = int(h), int(w)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise TypeError(f"{name} must be a pair (H, W) of positive integers; got {resolution!r}") from None
    if h_int != h or w_int != w or not (0 < h_int <= max_size and 0 < w_int <= max_size):
        raise ValueError(f"{name} must be a pair (H, W) of integers in [1, {max_size}]; got {resolution!r}")
    return h_int, w_int


def check_same_batch(names, arrays):
    """Raises ValueError unless the arrays' leading (batch) sizes agree."""
    sizes = {n: a.shape[0] for n, a in zip(names, arrays)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n} has {s}" for n, s in sizes.items())
        raise ValueError(f"batch sizes differ: {listed}")


def float_dtypes(xp):
    """The float dtypes an op takes on a backend: float32 and float64 on the CPU, float32 on the GPU."""
    return (np.float32, np.float64) if xp is np else (np.float32,)


def check_float(xp, name, a, *patterns):
    """check_array with the backend's float dtypes (a dtype error on the GPU says why float64 is refused);
    returns the index of the matching pattern."""
    try:
        return check_array(name, a, float_dtypes(xp), *patterns)
    except TypeError as e:
        raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None


def _byte_span(a):
    """[lo, hi): the bytes an array's elements lie in (numpy or cupy)."""
    lo = hi = a.data.ptr if is_cupy_array(a) else a.__array_interface__["data"][0]
    for n, stride in zip(a.shape, a.strides):
        if stride > 0:
            hi += stride * (n - 1)
        else:
            lo += stride * (n - 1)
    return lo, hi + a.itemsize


def check_accumulator(name, acc, like, xp, reads=()):
    """An array a backward adds its gradient into (an op's `add_to=`), checked against `like`, the array the
    gradient is of: the same device, dtype and shape, C-contiguous (the kernels add in place), and no byte
    shared with any of `reads`, the (name, array) pairs the kernels read while they add; returns acc."""
    device = "numpy" if xp is np else "cupy"
    if not hasattr(acc, "flags") or is_cupy_array(acc) != (xp is not np):
        raise TypeError(f"{name} must be a {device} array like the inputs; got {type(acc).__name__}")
    check_array(name, acc, like.dtype, tuple(like.shape))
    if xp is not np and acc.device.id != like.device.id:
        raise ValueError(f"{name} must be on the inputs' GPU (device {like.device.id}); got one on device "
                         f"{acc.device.id}")
    if not acc.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (the kernels add into it in place)")
    lo, hi = _byte_span(acc)
    for other_name, other in reads:
        other_lo, other_hi = _byte_span(other)
        if other.size and lo < other_hi and other_lo < hi:
            raise ValueError(f"{name} must not share memory with {other_name}: the gradient is added into {name} "
                             f"while {other_name} is read")
    return acc
