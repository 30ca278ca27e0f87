"""Kernel lookup for fastface.nn: each CUDA function fetched once per process and device.

`cupy.RawModule.get_function` makes a new Function object (a driver call) every time; a launch
on the hot path of a batch-of-one forward should cost nothing but the launch itself.
"""
import functools

from fastface._backend import cuda_module, cupy_or_none

__all__ = ["function"]


@functools.lru_cache(maxsize=None)
def _function(filename, name, name_expressions, device_id):
    return cuda_module(filename, name_expressions=name_expressions).get_function(name)


def function(filename, name, name_expressions=()):
    """The kernel `name` of kernels/`filename` on the current device."""
    return _function(filename, name, tuple(name_expressions), cupy_or_none().cuda.Device().id)
