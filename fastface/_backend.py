"""Dispatch between numpy (CPU, Numba kernels) and cupy (GPU, CUDA C kernels).

An op finds the array module of its inputs once with `array_module(...)`; it never
copies between host and device behind the caller's back, and mixing numpy with cupy
in one call is an error. `import fastface` works without cupy or without a GPU: cupy
is imported lazily, the first time a function needs to know about it.
"""
import functools
import importlib.resources
import pathlib
import re

import numpy as np

__all__ = ["array_module", "is_cupy_array", "cupy_or_none", "gpu_available", "cuda_module", "KernelFile",
           "read_kernel_source", "pointer_or_null", "NULL_POINTER", "MAX_GRID_Y", "images_on_grid_y", "grid_1d"]


@functools.lru_cache(maxsize=None)
def cupy_or_none():
    """The cupy module if it imports, else None (cached: the import is tried once)."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except Exception:  # ImportError, or a broken CUDA install raising on import
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def gpu_available():
    """True when cupy imports and sees at least one CUDA device."""
    cupy = cupy_or_none()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_cupy_array(a):
    # Checked by the class's module name so that numpy-only machines never import cupy.
    return type(a).__module__.startswith("cupy")


def array_module(*named_arrays):
    """Returns numpy or cupy, whichever holds all the given arrays.

    Args:
        named_arrays: (name, array) pairs; None arrays are skipped.

    Raises:
        TypeError: when some arrays are numpy and others cupy, naming both.
    """
    on_gpu, on_cpu = None, None
    for name, a in named_arrays:
        if a is None:
            continue
        if is_cupy_array(a):
            on_gpu = on_gpu or name
        else:
            on_cpu = on_cpu or name
    if on_gpu and on_cpu:
        raise TypeError(
            f"{on_cpu} is a numpy array but {on_gpu} is a cupy array; pass all arrays on one device "
            f"(fastface never copies between host and device behind your back)"
        )
    return cupy_or_none() if on_gpu else np


def _kernel_text(filename):
    try:
        return importlib.resources.files("fastface.kernels").joinpath(filename).read_text()
    except ModuleNotFoundError:
        # Running from a source checkout that shadows the installed package: the top-level
        # kernels/ folder is installed as fastface.kernels, so look for it beside fastface/.
        return (pathlib.Path(__file__).resolve().parent.parent / "kernels" / filename).read_text()


_LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cuh)"[ \t]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^#pragma once[ \t]*$", re.M)


def read_kernel_source(filename, _included=None):
    """The text of `kernels/<filename>` with each `#include "x.cuh"` of a kernels/ header replaced by the
    header's text (once per source; the headers use #pragma once for nvcc, which reads them itself).

    Pasting the headers in, rather than passing NVRTC an include path, keeps CuPy's compile cache
    honest: it keys on the source text, so an edited header is a new source.
    """
    included = set() if _included is None else _included

    def paste(match):
        header = match.group(1)
        if header in included:
            return f"// {header}: pasted above"
        included.add(header)
        text = _PRAGMA_ONCE.sub("", read_kernel_source(header, included))  # NVRTC warns of it in a main file
        return f"// ---- {header} ----\n{text}\n// ---- end of {header} ----"

    return _LOCAL_INCLUDE.sub(paste, _kernel_text(filename))


@functools.lru_cache(maxsize=None)
def _compiled_module(filename, name_expressions, options, device_id):
    cupy = cupy_or_none()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(
            code=read_kernel_source(filename),
            options=("-std=c++17",) + tuple(options),
            name_expressions=tuple(name_expressions) if name_expressions else None,
        )
        module.compile()
    return module


def cuda_module(filename, name_expressions=(), options=()):
    """The compiled `kernels/<filename>` for the current device, compiled once per process.

    Kernels are fetched with `module.get_function(name)`; templates are named in
    `name_expressions` (for example "rasterize_fwd<true>") so one source serves every variant.
    """
    cupy = cupy_or_none()
    return _compiled_module(filename, tuple(name_expressions), tuple(options), cupy.cuda.Device().id)


class KernelFile:
    """One `kernels/<filename>` source and every kernel fastface launches from it.

    Each op module declares its file once, at import:

        _KERNELS = KernelFile("rasterize.cu", ["rasterize_fwd", "rasterize_resolve<3>"], ("--fmad=false",))
        _KERNELS("rasterize_resolve<3>")(grid, block, args)

    Calling it returns the cupy Function for the current device. The file is compiled once per process and
    device. Template instances (names with "<") are compiled as `name_expressions`, and plain names must be
    `extern "C"`. A lookup costs one dict access: the batch-of-one path counts microseconds, and
    `RawModule.get_function` makes a new Function (a driver call) each time.

    Because every launched kernel is declared, tests/test_kernels_compile.py can compile each file with
    nvcc and take the address of every declared kernel. A misspelt or missing kernel then fails on a machine
    without a GPU.
    """

    declared = []  # every KernelFile made so far, for the compile test

    def __init__(self, filename, kernels, options=()):
        self.filename = filename
        self.kernels = tuple(kernels)
        self.options = tuple(options)
        self.name_expressions = tuple(k for k in self.kernels if "<" in k)
        self._functions = {}  # (kernel name, device id) -> cupy Function
        KernelFile.declared.append(self)

    def __call__(self, name):
        device_id = cupy_or_none().cuda.runtime.getDevice()
        function = self._functions.get((name, device_id))
        if function is None:
            if name not in self.kernels:
                raise KeyError(f"kernel {name!r} is not declared for kernels/{self.filename}; declared: "
                               f"{', '.join(self.kernels)}")
            module = cuda_module(self.filename, self.name_expressions, self.options)
            function = module.get_function(name)
            self._functions[(name, device_id)] = function
        return function

    def __repr__(self):
        return f"KernelFile({self.filename!r}, {len(self.kernels)} kernels, options={self.options})"


# A null pointer as a kernel argument. CuPy packs a numpy integer by its byte size, so this arrives
# as an 8-byte zero; Python None does not (cupy/cupy#9046: the kernel sees a garbage address).
NULL_POINTER = np.uint64(0)


def pointer_or_null(a):
    """`a` for a pointer parameter of a kernel, or a null pointer when `a` is None."""
    return NULL_POINTER if a is None else a


MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y


def images_on_grid_y(batch, op):
    """`batch` for kernels that give each image its own row of blocks (gridDim.y = B, no loop past the
    limit); ValueError naming `op` when the batch exceeds what one launch can hold."""
    if batch > MAX_GRID_Y:
        raise ValueError(f"{op} on the GPU takes at most {MAX_GRID_Y} images per call (one row of CUDA blocks "
                         f"per image); got {batch}: split the batch")
    return batch


def grid_1d(n, block=256):
    """(grid, block) tuples covering n threads with blocks of `block`."""
    return ((int(n) + block - 1) // block,), (block,)
