"""A fake cupy on numpy, and a checker of every kernel launch against its CUDA C signature.

Most machines that run fastface's tests have no GPU, so the branches taken for cupy arrays would only
run on the rare machine that has one. `install(monkeypatch)` makes them run on the CPU, for the
duration of one test:

- `sys.modules["cupy"]` becomes a module holding exactly the cupy API that fastface's GPU branches use,
  on top of numpy (`FAKE_CUPY_API` lists it; anything else raises AttributeError naming what to add).
  Its arrays are an `ndarray` subclass of numpy's whose class module is "cupy", so
  `fastface._backend.is_cupy_array` is True for them. They have cupy's `.data.ptr` (the real host address,
  so alignment checks mean something), `.device.id` (0), `.get()`, `.set()`, and cupy's `.flags` (only
  c_contiguous, f_contiguous and owndata: cupy has no `writeable`). numpy operations on them return them;
  mixing them with numpy arrays raises TypeError, as cupy does. New arrays are 256-byte aligned like
  cupy's memory pool, and `empty` fills them with 0xFF bytes (NaN floats, -1 integers): garbage, as on a
  GPU.
- Every fastface module's `cupy_or_none` returns the fake.
- `KernelFile.__call__` returns a `LaunchChecker`: calling it with (grid, block, args[, shared_mem]) checks
  the launch against the kernel's parameter list parsed from `read_kernel_source(filename)` (template
  arguments substituted from the name expression), records it in `FakeGpu.launches` and computes nothing.
  Outputs keep what they were allocated with; tests must not check values.
- Compute mode, `install(monkeypatch, compute=True)`: after the checks, a kernel that tests/emulated_kernels.py
  can run on the host runs there on the arrays' memory (its threads one after another when they never
  cooperate; with each block's threads together when they use barriers, shuffles, votes or shared memory;
  only kernels with inline PTX cannot run); `FakeGpu.computed` and `FakeGpu.check_only` list
  which launches ran and which did not (those leave their outputs as allocated). New arrays get red
  zones (`_check_red_zones`): an emulated kernel that writes outside an array it was given raises
  LaunchError naming the argument, instead of corrupting the process's heap (a read there sees 0xA5
  bytes; a write or read far beyond them can still crash the process).
- CUDA graphs (`Stream.begin_capture` ... `end_capture`, `Graph.launch`), in both modes, as a real GPU
  records them: during a capture no device operation runs. Each one (a kernel launch, a fill, a copy,
  an elementwise or reduction operation, a gather, a memset, a GEMM) is recorded with its operands by
  reference and its scalars by value, and every `launch()` of the graph runs the recorded list again
  on the same memory (computing only what compute mode computes). So a replay sees the buffers as they
  are then, and a Python value that changed since the capture is not seen, as on a GPU. An operation
  that makes a new array computes its shape at once (values garbage until a replay, as in a pool block).
  What cannot be recorded raises LaunchError: reading a device value on the host (`get`, `float`,
  `bool`, `int`, `item`), a host-to-device copy (`asarray` of host data, `set`), a synchronisation,
  what needs the host to know a count (boolean masks, `nonzero`, `unique`), and joining more than 8
  arrays (`stack`, `concatenate`: cupy then sends a table of their pointers from the host).
  `cuda.MemoryPool` and `cuda.using_allocator` exist (an allocation during a capture comes from the
  allocator then in use; the fake has one memory).
- `cuda.runtime.hostAlloc` returns a real host buffer, so fastface/_device_checks.py's deferred checks
  run (in check-only mode their kernels never write it, so no check ever fails; in compute mode the
  check kernels run too and report bad values as on a GPU).
- fastface/_gemm.py's cuBLAS (`_cublas()`) becomes `FakeCublas`: it checks cublasGemmEx's arguments
  (types, transposes, leading dimensions, every matrix inside one allocation) and computes the product
  with numpy on the arrays' memory.

What the checker rejects (`LaunchError`), for each kernel argument:
- pointer parameters (`T*`): anything but a fake cupy array of T's dtype (float/float2/float4 -> float32,
  int -> int32, unsigned long long -> uint64, __half -> float16, double -> float64, long long -> int64),
  C-contiguous and aligned to the pointee's size (8 for float2, 16 for float4), or exactly
  `fastface._backend.NULL_POINTER` for a null. Python None is rejected: CuPy passes it as a garbage
  pointer (cupy/cupy#9046). One deliberate alias is allowed (ALIASED_POINTERS): the rasterizer keeps its
  64-bit depth keys in the float32 `bary` output, (B, H, W, 2), 8 bytes a pixel.
- scalar parameters: anything but a numpy scalar of exactly the C type's dtype (int -> np.int32,
  long long -> np.int64, unsigned long long -> np.uint64, float -> np.float32, double -> np.float64):
  CuPy packs a numpy scalar by its size, but a Python int as 8 bytes and a Python float as a double,
  whatever the kernel expects.
- the argument count; grid: 1 to 3 positive Python ints, x < 2^31, y and z <= 65535; block: 1 to 3
  positive Python ints, x and y <= 1024, z <= 64, at most 1024 threads and at most the kernel's
  `__launch_bounds__`; shared_mem: an int, nonzero only for a kernel with `extern __shared__` memory, and
  with the static __shared__ arrays of the kernel's body (not of the device functions it calls) at most
  48 KiB; a template kernel launched by its plain name or an extern "C" one with
  template arguments (NVRTC would not find either); a name the KernelFile does not declare.
- vector loads and atomics the signature does not show (`_vector_alignment`): 16-byte Pack/float4
  accesses in nn_conv*.cu and float2/float4 atomics into grad_attr.
"""
import ast
import contextlib
import ctypes
import functools
import importlib
import operator
import pkgutil
import re
import sys
import types

import numpy as np

import fastface
from fastface import _backend
from fastface._backend import NULL_POINTER, KernelFile, read_kernel_source

__all__ = ["install", "FakeGpu", "LaunchError", "ndarray", "kernel_signature", "FAKE_CUPY_API"]

_POOL_ALIGNMENT = 256  # cupy's memory pool hands out 256-byte aligned blocks; vector loads rely on it
_MAX_GRID_X = 2 ** 31 - 1
_MAX_GRID_YZ = 65535
_MAX_BLOCK = (1024, 1024, 64)
_MAX_THREADS = 1024
_MAX_SHARED = 48 * 1024  # dynamic shared memory a launch gets without opting in


class LaunchError(AssertionError):
    """A kernel launch or a cuBLAS call that would misbehave on a GPU."""


# ---------------------------------------------------------------------------------------------
# Memory: every allocation an address was taken from, so that an address (memsetAsync, cuBLAS)
# can be checked to lie inside one. Strong references: an address is never reused while installed.

_allocations = {}  # id(owner) -> (start address, end address, flat uint8 view of the owner's memory)

# Compute mode surrounds every new array with red zones of _CANARY bytes, checked after each emulated
# kernel for the arrays it was given: a kernel (or a launch) that writes past an array's end then fails
# naming the argument, instead of corrupting the Python heap. A red zone is as long as the array (at
# least _MIN_RED_ZONE bytes), so an image or batch index one too far still lands in it.
_guard_allocations = False

# Every operation that would be GPU work on real cupy (a launch, a fill, a copy, an elementwise or
# reduction kernel, a memset, a scan, a GEMM, a transfer), in order: `FakeGpu.device_work` gives it to
# tests that count what a call costs in launches (tests/test_gpu_launch_budget.py).
_device_work = []
_in_array_function = []  # the numpy functions being dispatched right now, outermost first
_guards = {}  # id(owner buffer) -> (owner buffer, offset of the array's memory, its byte count)
# The device operations of the stream capture in progress (a list of callables), or no list when none is:
# see the module docstring's CUDA graphs.
_captures = []
_CANARY = 0xA5
_MIN_RED_ZONE = 4096


def _owner(a):
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


def _register(a):
    root = _owner(a)
    if id(root) not in _allocations:
        guarded = _guards.get(id(root))
        if guarded is not None:  # the array's memory, not its red zones
            _, offset, nbytes = guarded
            flat = np.asarray(root)[offset:offset + nbytes]
            start = root.ctypes.data + offset
            _allocations[id(root)] = (start, start + nbytes, flat, root)
            return
        flat = np.asarray(root).reshape(-1).view(np.uint8) if root.flags["C_CONTIGUOUS"] else None
        start = root.ctypes.data
        _allocations[id(root)] = (start, start + root.nbytes, flat, root)


def _check_red_zones(a, where):
    """LaunchError when a byte around a's allocation (compute mode's red zones) is no longer _CANARY."""
    guarded = _guards.get(id(_owner(a)))
    if guarded is None:
        return
    buffer, offset, nbytes = guarded
    host = np.asarray(buffer)
    before = np.flatnonzero(host[:offset] != _CANARY)
    after = np.flatnonzero(host[offset + nbytes:] != _CANARY)
    if before.size or after.size:
        host[:offset] = _CANARY  # so that the next check of this array reports only new writes
        host[offset + nbytes:] = _CANARY
        where_ = (f"{offset - before[0]} bytes before its start" if before.size
                  else f"{after[0]} bytes past its end")
        raise LaunchError(f"{where}: {before.size + after.size} bytes around its {nbytes}-byte allocation were "
                          f"written, the first {where_}: an index outside the array")


def _allocation_of(address, size, what):
    """The flat uint8 view and offset of the allocation holding [address, address + size)."""
    for start, end, flat, _ in _allocations.values():
        if start <= address and address + size <= end and flat is not None:
            return flat, address - start
    raise LaunchError(f"{what}: [{address:#x}, {address + size:#x}) lies in no fake cupy allocation "
                      f"(an address past the end of an array, or of a freed or host array)")


def _device_op(run):
    """Does a device operation now, or records it into the capture in progress (a graph's replays run it)."""
    if _captures:
        _captures[-1].append(run)
    else:
        run()


def _forbid_in_capture(what):
    if _captures:
        raise LaunchError(f"{what} during a stream capture: a CUDA graph cannot record it (the capture fails on a "
                          f"GPU, or the graph replays a stale value)")


def _fake_arrays(values, found=None):
    """The fake arrays among values (nested in lists, tuples and dicts)."""
    found = [] if found is None else found
    for v in values:
        if isinstance(v, ndarray):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            _fake_arrays(v, found)
        elif isinstance(v, dict):
            _fake_arrays(list(v.values()), found)
    return found


def _new_arrays(result, operands):
    """The arrays of `result` (an array or a tuple/list of them) that are not views of an operand's memory."""
    owners = {id(_owner(a)) for a in _fake_arrays(operands)}
    results = result if isinstance(result, (tuple, list)) else [result]
    return [r for r in results if isinstance(r, np.ndarray) and id(_owner(r)) not in owners]


def _record_recompute(results, compute):
    """In a capture: record that a replay recomputes `results` (new arrays) with `compute()` and stores them there."""
    if not _captures or not results:
        return

    def run():
        fresh = compute()
        fresh = fresh if isinstance(fresh, (tuple, list)) else [fresh]
        for target, value in zip(results, fresh):
            np.copyto(_host(target), np.asarray(value).view(np.ndarray), casting="unsafe")

    _captures[-1].append(run)


def _allocate(shape, dtype, fill=None):
    """A fake cupy array in fresh 256-byte aligned memory (garbage 0xFF bytes unless `fill` is given)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    red_zone = max(_MIN_RED_ZONE, nbytes) if _guard_allocations else 0
    buffer = np.empty(red_zone + nbytes + _POOL_ALIGNMENT + red_zone, np.uint8)
    offset = red_zone + (-(buffer.ctypes.data + red_zone)) % _POOL_ALIGNMENT
    if red_zone:
        buffer.fill(_CANARY)
        _guards[id(buffer)] = (buffer, offset, nbytes)
    memory = buffer[offset:offset + nbytes]
    memory.fill(0xFF)
    a = memory.view(dtype).reshape(shape).view(ndarray)
    if fill is not None:
        _device_work.append("fill")
        _device_op(lambda: np.copyto(_host(a), fill, casting="unsafe"))
    return a


def _host(a):
    """The numpy view of a fake array's memory."""
    return a.view(np.ndarray)


def _wrap(result):
    """numpy results as fake cupy arrays (cupy returns 0-d arrays where numpy returns scalars)."""
    if isinstance(result, ndarray):
        return result
    if isinstance(result, np.ndarray):
        return result.view(ndarray)
    if isinstance(result, np.generic):
        return np.asarray(result).view(ndarray)
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, list):
        return [_wrap(r) for r in result]
    return result


def _reject_host_arrays(values, what):
    for v in values:
        if isinstance(v, (list, tuple)):
            _reject_host_arrays(v, what)
        elif isinstance(v, np.ndarray) and not isinstance(v, ndarray) and v.ndim > 0:
            raise TypeError(f"{what}: got a numpy array among cupy arrays; cupy does not convert host arrays "
                            f"implicitly (use cupy.asarray)")


_HOST_COUNT_FUNCTIONS = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"}
# cupy joins at most this many arrays by one copy each; more go through one kernel that reads a table of
# their pointers, which cupy sends from the host (core.array of a numpy array): not recordable.
_CUPY_CONCATENATE_COPIES = 8


def _host_key(key):
    """An index with its fake arrays as numpy views of their memory."""
    if isinstance(key, tuple):
        return tuple(_host_key(k) for k in key)
    return _host(key) if isinstance(key, ndarray) else key


class _MemoryPointer:
    def __init__(self, a):
        _register(a)
        self.ptr = int(a.ctypes.data)


class _Flags:
    """cupy.ndarray.flags: these three attributes only (no `writeable`: cupy arrays have none)."""

    def __init__(self, a):
        numpy_flags = np.ndarray.flags.__get__(a)
        self.c_contiguous = bool(numpy_flags["C_CONTIGUOUS"])
        self.f_contiguous = bool(numpy_flags["F_CONTIGUOUS"])
        self.owndata = bool(numpy_flags["OWNDATA"])

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[key]


class ndarray(np.ndarray):  # noqa: N801 - the name cupy's array class has
    """A numpy array posing as a cupy array (see the module docstring)."""

    __module__ = "cupy"

    @property
    def data(self):
        return _MemoryPointer(self)

    @property
    def device(self):
        return Device(0)

    @property
    def flags(self):
        return _Flags(self)

    def get(self, stream=None, order="C", out=None, blocking=True):
        _forbid_in_capture("a device-to-host copy (get)")
        _device_work.append("device-to-host copy")
        return np.array(_host(self), order=order, copy=True)

    def _to_host_value(self, what):
        _forbid_in_capture(f"{what} of a cupy array (a device-to-host copy)")

    def __float__(self):
        self._to_host_value("float()")
        return super().__float__()

    def __int__(self):
        self._to_host_value("int()")
        return super().__int__()

    def __bool__(self):
        self._to_host_value("bool()")
        return super().__bool__()

    def item(self, *args):
        self._to_host_value("item()")
        return super().item(*args)

    def tolist(self):
        self._to_host_value("tolist()")
        return super().tolist()

    def __getitem__(self, key):
        if _captures and any(a.dtype == np.bool_ for a in _fake_arrays([key])):
            _forbid_in_capture("indexing by a boolean mask (its count is needed on the host)")
        result = super().__getitem__(key)
        if _captures and isinstance(result, np.ndarray) and _owner(result) is not _owner(self):
            # A gather (fancy indexing) makes a new array: a replay gathers again from the memory as it is then.
            _record_recompute([result], lambda: np.ndarray.__getitem__(_host(self), _host_key(key)))
        return result

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim:
            _forbid_in_capture("a host-to-device copy (setting host data)")
        _device_work.append("copy" if isinstance(value, ndarray) else "fill")
        _device_op(lambda: np.ndarray.__setitem__(self, key, value))

    def set(self, arr, stream=None):
        # cupy's checks, in its order.
        if not isinstance(arr, np.ndarray) or isinstance(arr, ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError("Shape mismatch")
        if not self.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        _forbid_in_capture("a host-to-device copy (set)")
        _device_work.append("host-to-device copy")
        np.copyto(_host(self), arr)

    def copy(self, order="C"):
        _device_work.append("copy")
        out = _allocate(self.shape, self.dtype)
        _device_op(lambda: np.copyto(_host(out), _host(self)))
        return out

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        dtype = np.dtype(dtype)
        if not copy and dtype == self.dtype:
            return self
        _device_work.append("copy")
        out = _allocate(self.shape, dtype)
        _device_op(lambda: np.copyto(_host(out), _host(self), casting="unsafe"))
        return out

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _reject_host_arrays(inputs + (out or ()), f"cupy.{ufunc.__name__}")
        _device_work.append(f"{ufunc.__name__}{'' if method == '__call__' else '.' + method}")
        inputs = tuple(_host(x) if isinstance(x, ndarray) else x for x in inputs)
        if out is not None or method == "at":  # writes memory that exists: recorded as it is in a capture
            if out is not None:
                kwargs["out"] = tuple(_host(o) if isinstance(o, ndarray) else o for o in out)
            _device_op(lambda: getattr(ufunc, method)(*inputs, **kwargs))
            if out is None:
                return None
            return out[0] if len(out) == 1 else out
        result = _wrap(getattr(ufunc, method)(*inputs, **kwargs))
        # A new result (its shape is known now): a replay computes it again into the same memory.
        _record_recompute(_new_arrays(result, ()), lambda: getattr(ufunc, method)(*inputs, **kwargs))
        return result

    def __array_function__(self, func, types_, args, kwargs):
        if not all(issubclass(t, ndarray) for t in types_):
            raise TypeError(f"numpy.{func.__name__} got numpy and cupy arrays together")
        # One entry per call from fastface: numpy's own functions dispatch again inside (stack calls
        # concatenate), and those inner calls are not more work.
        outermost = not _in_array_function
        if outermost:
            _device_work.append(func.__name__)
            if func.__name__ in _HOST_COUNT_FUNCTIONS:
                _forbid_in_capture(f"numpy.{func.__name__} (its result's size is needed on the host)")
            if func.__name__ in ("concatenate", "stack", "hstack", "vstack") and args and \
                    isinstance(args[0], (list, tuple)) and len(args[0]) > _CUPY_CONCATENATE_COPIES:
                # cupy/_core/_routines_manipulation.pyx, _concatenate_single_kernel: core.array(ptrs)
                _forbid_in_capture(f"cupy.{func.__name__} of {len(args[0])} arrays (more than "
                                   f"{_CUPY_CONCATENATE_COPIES}: cupy copies a table of their pointers from the host)")
        _in_array_function.append(func.__name__)
        try:
            result = _wrap(super().__array_function__(func, types_, args, kwargs))
        finally:
            _in_array_function.pop()
        if outermost and _captures:
            if result is None:  # an in-place function (copyto): a replay does it again
                _captures[-1].append(lambda: func(*args, **kwargs))
            else:
                _record_recompute(_new_arrays(result, (args, kwargs)), lambda: func(*args, **kwargs))
        return result

    def __repr__(self):
        return f"fake_cupy.{np.array_repr(_host(self))}"

    __str__ = __repr__


# ---------------------------------------------------------------------------------------------
# The cupy API fastface uses (grep fastface/ for `cupy.`, `xp.` and the array methods above)

def empty(shape, dtype=float, order="C"):
    return _allocate(shape, dtype)


def zeros(shape, dtype=float, order="C"):
    return _allocate(shape, dtype, fill=0)


def ones(shape, dtype=float, order="C"):
    return _allocate(shape, dtype, fill=1)


def full(shape, fill_value, dtype=None, order="C"):
    return _allocate(shape, np.result_type(fill_value) if dtype is None else dtype, fill=fill_value)


def _require_cupy(a, what):
    if not isinstance(a, ndarray):
        raise TypeError(f"cupy.{what} takes a cupy array; got {type(a).__module__}.{type(a).__name__}")


def empty_like(a, dtype=None, order="K", subok=None, shape=None):
    _require_cupy(a, "empty_like")
    return _allocate(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None, order="K", subok=None, shape=None):
    _require_cupy(a, "zeros_like")
    return _allocate(a.shape if shape is None else shape, a.dtype if dtype is None else dtype, fill=0)


def asarray(a, dtype=None, order=None, blocking=False):
    """Host data is copied to the device; a cupy array of the right dtype is returned as is."""
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    if not isinstance(a, ndarray):
        _forbid_in_capture("a host-to-device copy (asarray of host data)")
    source = _host(a) if isinstance(a, ndarray) else np.asarray(a)
    _device_work.append("copy" if isinstance(a, ndarray) else "host-to-device copy")
    out = _allocate(source.shape, source.dtype if dtype is None else dtype)
    _device_op(lambda: np.copyto(_host(out), source, casting="unsafe"))
    return out


def ascontiguousarray(a, dtype=None):
    _require_cupy(a, "ascontiguousarray")
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return a.astype(a.dtype if dtype is None else dtype)


def cumsum(a, axis=None, dtype=None, out=None):
    _require_cupy(a, "cumsum")
    _device_work.append("scan")
    if out is not None:
        _require_cupy(out, "cumsum(out=...)")
        _device_op(lambda: np.cumsum(_host(a), axis=axis, dtype=dtype, out=_host(out)))
        return out
    result = _wrap(np.cumsum(_host(a), axis=axis, dtype=dtype))
    _record_recompute([result], lambda: np.cumsum(_host(a), axis=axis, dtype=dtype))
    return result


def where(condition, x, y):
    _reject_host_arrays((condition, x, y), "cupy.where")
    operands = [_host(v) if isinstance(v, ndarray) else v for v in (condition, x, y)]
    result = _wrap(np.where(*operands))
    _record_recompute([result], lambda: np.where(*operands))
    return result


def _ufunc(numpy_ufunc):
    def call(*args, **kwargs):
        out = kwargs.get("out")
        outs = (out,) if isinstance(out, np.ndarray) else tuple(out or ())
        if not any(isinstance(a, ndarray) for a in args + outs):
            raise TypeError(f"cupy.{numpy_ufunc.__name__} got no cupy array")
        return numpy_ufunc(*args, **kwargs)  # dispatches to ndarray.__array_ufunc__

    call.__name__ = numpy_ufunc.__name__
    return call


multiply, maximum, isfinite = _ufunc(np.multiply), _ufunc(np.maximum), _ufunc(np.isfinite)


class RawModule:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("the fake cupy compiles nothing: KernelFile.__call__ must be patched (install())")


# -- cupy.cuda ---------------------------------------------------------------------------------

class Device:
    """Device 0, the only one."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def __enter__(self):
        if self.id != 0:
            raise RuntimeError(f"the fake cupy has device 0 only; got Device({self.id})")
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        _forbid_in_capture("Device.synchronize()")


class _Graph:
    """A captured graph: the device operations recorded during the capture, run again by each launch."""

    def __init__(self, operations):
        self.operations = operations
        self.launches = 0

    def launch(self, stream=None):
        _device_work.append("graph launch")
        self.launches += 1
        _device_op(self._replay)  # a launch inside another capture is recorded as a child graph

    def _replay(self):
        counted = len(_device_work)
        for run in self.operations:
            run()
        del _device_work[counted:]  # the recorded operations are the graph launch's work, counted once


class MemoryPool:
    """cupy.cuda.MemoryPool: the fake has one memory; `malloc` exists for `using_allocator`."""

    def malloc(self, size):
        raise LaunchError("the fake cupy allocates through _allocate, not through a pool's malloc")

    def used_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


@contextlib.contextmanager
def using_allocator(allocator=None):
    """cupy.cuda.using_allocator: allocations inside come from `allocator` (one memory in the fake)."""
    if allocator is not None and not callable(allocator):
        raise TypeError(f"allocator must be callable; got {allocator!r}")
    yield


class Stream:
    _next_handle = 0x5000

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        if null:
            self.ptr = 0
        else:
            Stream._next_handle += 0x100
            self.ptr = Stream._next_handle
        self._capturing = False
        self._previous = []

    def __enter__(self):
        self._previous.append(_current_stream[0])
        _current_stream[0] = self
        return self

    def __exit__(self, *exc):
        _current_stream[0] = self._previous.pop()
        return False

    def synchronize(self):
        _forbid_in_capture("Stream.synchronize()")

    def is_capturing(self):
        return self._capturing

    def begin_capture(self, mode=None):
        if self._capturing:
            raise RuntimeError("the stream is capturing already")
        if self.ptr == 0:
            raise RuntimeError("the null stream cannot capture a graph")
        if _captures:
            raise LaunchError("a second stream capture while one is in progress (not modelled)")
        self._capturing = True
        _captures.append([])

    def end_capture(self):
        if not self._capturing:
            raise RuntimeError("the stream is not capturing")
        self._capturing = False
        return _Graph(_captures.pop())


_current_stream = [Stream(null=True)]


def get_current_stream(device_id=None):
    return _current_stream[0]


HOST_ADDRESSES = set()  # every address hostAlloc returned, ever: to tell a fake pinned record from a real one


class _Runtime:
    hostAllocDefault, hostAllocPortable, hostAllocMapped, hostAllocWriteCombined = 0, 1, 2, 4

    def __init__(self):
        self.host_buffers = {}  # address -> ctypes buffer, alive while installed

    @staticmethod
    def getDevice():  # noqa: N802 - cupy's name
        return 0

    @staticmethod
    def getDeviceCount():  # noqa: N802
        return 1

    @staticmethod
    def deviceSynchronize():  # noqa: N802
        _forbid_in_capture("cudaDeviceSynchronize")

    def hostAlloc(self, size, flags):  # noqa: N802
        if type(size) is not int or size <= 0 or type(flags) is not int or flags & ~7:
            raise LaunchError(f"hostAlloc(size={size!r}, flags={flags!r}): size must be a positive int and flags "
                              f"a combination of the hostAlloc* constants")
        buffer = (ctypes.c_uint8 * size)()
        address = ctypes.addressof(buffer)
        self.host_buffers[address] = buffer
        HOST_ADDRESSES.add(address)
        return address

    @staticmethod
    def memsetAsync(ptr, value, size, stream):  # noqa: N802
        for name, v in (("ptr", ptr), ("value", value), ("size", size), ("stream", stream)):
            if type(v) is not int:
                raise LaunchError(f"memsetAsync: {name} must be a Python int; got {type(v).__name__} {v!r}")
        if not 0 <= value <= 255 or size < 0:
            raise LaunchError(f"memsetAsync: value must be a byte and size >= 0; got {value}, {size}")
        _allocation_of(ptr, size, "memsetAsync")
        _device_work.append("memset")
        _device_op(lambda: ctypes.memset(ptr, value, size))


def _cuda_namespace(runtime):
    return types.SimpleNamespace(runtime=runtime, Device=Device, Stream=Stream, get_current_stream=get_current_stream,
                                 MemoryPool=MemoryPool, using_allocator=using_allocator)


FAKE_CUPY_API = ("ndarray", "float16", "float32", "float64", "int32", "int64", "uint8", "uint64", "bool_",
                 "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "asarray", "ascontiguousarray",
                 "cumsum", "where", "multiply", "maximum", "isfinite", "RawModule", "cuda")
# fastface.fit's GPU path (array arithmetic between the kernels: the landmark stage, the SH solve).
FAKE_CUPY_API += ("concatenate", "stack", "full_like", "matmul", "sqrt")


def _fake_module():
    module = types.ModuleType("cupy", "fake cupy (tests/fake_cupy.py)")
    namespace = globals()
    for name in FAKE_CUPY_API:
        if name == "cuda":
            module.cuda = _cuda_namespace(_Runtime())
        elif name in namespace:
            setattr(module, name, namespace[name])
        else:
            setattr(module, name, getattr(np, name))  # the dtypes

    def missing(name):
        raise AttributeError(f"the fake cupy has no {name!r}: fastface now uses it on its GPU path; add it to "
                             f"tests/fake_cupy.py (FAKE_CUPY_API)")

    module.__getattr__ = missing
    return module


# ---------------------------------------------------------------------------------------------
# CUDA signatures

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_KERNEL = re.compile(
    r'(?:template\s*<(?P<template>[^<>]*)>\s*)?'
    r'(?P<extern_c>extern\s+"C"\s+)?'
    r'__global__\s+void\s+'
    r'(?:__launch_bounds__\s*\((?P<bounds>[^()]*)\)\s*)?'
    r'(?P<name>[A-Za-z_]\w*)\s*\(')
_QUALIFIERS = {"const", "__restrict__", "__restrict", "volatile"}

# C type -> (numpy dtype of the memory, alignment in bytes) for pointer parameters.
POINTEE_TYPES = {
    "float": (np.float32, 4), "float2": (np.float32, 8), "float4": (np.float32, 16),
    "int": (np.int32, 4), "unsigned int": (np.uint32, 4), "long long": (np.int64, 8),
    "unsigned long long": (np.uint64, 8), "__half": (np.float16, 2), "double": (np.float64, 8),
    "unsigned char": (np.uint8, 1),
}
# C type -> the numpy scalar type CuPy packs into it (by size; a Python int would go in as 8 bytes).
SCALAR_TYPES = {
    "int": np.int32, "unsigned int": np.uint32, "long long": np.int64, "unsigned long long": np.uint64,
    "float": np.float32, "double": np.float64, "bool": np.bool_,
}


class Parameter:
    def __init__(self, name, c_type, pointer):
        self.name, self.c_type, self.pointer = name, c_type, pointer

    def __repr__(self):
        return f"{self.c_type}{'*' if self.pointer else ''} {self.name}"


class KernelSignature:
    """A kernel's parameters after template substitution, and what its definition says of launches."""

    def __init__(self, filename, expression, parameters, extern_c, launch_bounds, dynamic_shared, static_shared,
                 template_values):
        self.filename, self.expression = filename, expression
        self.parameters, self.extern_c = parameters, extern_c
        self.launch_bounds, self.dynamic_shared = launch_bounds, dynamic_shared
        self.static_shared = static_shared  # bytes of the kernel body's own static __shared__ arrays
        self.template_values = template_values

    def __repr__(self):
        return f"{self.expression}({', '.join(map(repr, self.parameters))})"


def _split_top_level(text):
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _matching(text, start, open_ch, close_ch):
    """The index of the bracket closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_ch}{close_ch} from offset {start}")


@functools.lru_cache(maxsize=None)
def _parsed_source(filename):
    """(definitions: name -> [(template, extern_c, bounds, params text, body)], integer constants)."""
    text = _COMMENT.sub(" ", read_kernel_source(filename)).replace("\\\n", " ")
    constants, kept = {}, []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("#"):
            m = re.match(r"#\s*define\s+([A-Za-z_]\w*)\s+(.+)$", stripped)  # object-like macros only
            if m:
                constants[m.group(1)] = m.group(2).strip()
            kept.append("")
        else:
            kept.append(line)
    text = "\n".join(kept)
    for m in re.finditer(r"constexpr\s+(?:unsigned\s+)?(?:int|long long|long)\s+([A-Za-z_]\w*)\s*=\s*([^;]+);", text):
        constants.setdefault(m.group(1), m.group(2).strip())
    definitions = {}
    for m in _KERNEL.finditer(text):
        open_paren = m.end() - 1
        close_paren = _matching(text, open_paren, "(", ")")
        rest = text[close_paren + 1:].lstrip()
        if not rest.startswith("{"):
            continue  # a declaration; the definition carries the names
        body_start = close_paren + 1 + (len(text[close_paren + 1:]) - len(rest))
        body = text[body_start:_matching(text, body_start, "{", "}") + 1]
        definitions.setdefault(m.group("name"), []).append(
            (m.group("template"), bool(m.group("extern_c")), m.group("bounds"), text[open_paren + 1:close_paren], body))
    return definitions, constants


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.floordiv, ast.Mod: operator.mod, ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_COMPARE = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Eq: operator.eq,
            ast.NotEq: operator.ne}


def _python_expression(c_expression):
    """A C integer constant expression as Python: `c ? a : b` (outermost, right-associative) becomes
    `(a) if (c) else (b)`; the rest (+ - * / % << >> < > parentheses) reads the same."""
    text, depth = c_expression.strip(), 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "?" and depth == 0:
            nested = 0
            for j in range(i + 1, len(text)):
                nested += text[j] in "(?"
                nested -= text[j] == ")"
                if text[j] == ":" and nested == 0:
                    return (f"({_python_expression(text[i + 1:j])}) if ({_python_expression(text[:i])}) "
                            f"else ({_python_expression(text[j + 1:])})")
                nested -= text[j] == ":" and nested > 0
    return text


def _evaluate(expression, names, what):
    """An integer C constant expression over `names` (template values and constants of the source)."""
    def value(node, depth=0):
        if depth > 50:
            raise ValueError("too deep")
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return value(ast.parse(_python_expression(str(names[node.id])), mode="eval").body, depth + 1)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left, depth), value(node.right, depth))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand, depth)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            return int(_COMPARE[type(node.ops[0])](value(node.left, depth), value(node.comparators[0], depth)))
        if isinstance(node, ast.IfExp):
            return value(node.body, depth) if value(node.test, depth) else value(node.orelse, depth)
        raise ValueError(ast.dump(node))

    try:
        return value(ast.parse(_python_expression(expression), mode="eval").body)
    except (SyntaxError, ValueError) as e:
        raise LaunchError(f"{what}: cannot evaluate {expression!r} ({e}); teach tests/fake_cupy.py._evaluate") from None


_SHARED_ARRAY = re.compile(r"(?<!extern)\s__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?"
                           r"(?P<type>[A-Za-z_][\w ]*?)\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]+\])+)\s*;")
_ELEMENT_BYTES = {"float": 4, "int": 4, "unsigned int": 4, "double": 8, "__half": 2, "unsigned char": 1, "char": 1,
                  "float2": 8, "float4": 16, "long long": 8, "unsigned long long": 8}


def _static_shared_bytes(body, names, what):
    """The bytes of the static __shared__ arrays declared in a kernel's own body (not in the device
    functions it calls)."""
    total = 0
    for m in _SHARED_ARRAY.finditer(body):
        if m.group("type") not in _ELEMENT_BYTES:
            raise LaunchError(f"{what}: __shared__ element type {m.group('type')!r} is not modelled")
        count = 1
        for dim in re.findall(r"\[([^\]]+)\]", m.group("dims")):
            count *= _evaluate(dim, names, f"{what}: __shared__ {m.group('name')}")
        total += count * _ELEMENT_BYTES[m.group("type")]
    return total


def _parse_parameter(text, type_arguments, what):
    tokens = re.findall(r"[A-Za-z_]\w*|\*|&|\[", text)
    if "&" in tokens or "[" in tokens:
        raise LaunchError(f"{what}: parameter {text!r}: references and arrays are not modelled")
    pointer = tokens.count("*")
    words = [t for t in tokens if t not in _QUALIFIERS and t != "*"]
    if len(words) < 2:
        raise LaunchError(f"{what}: parameter {text!r} has no name")
    name, type_words = words[-1], words[:-1]
    c_type = " ".join(type_arguments.get(w, w) for w in type_words)
    if pointer > 1:
        raise LaunchError(f"{what}: parameter {text!r}: pointers to pointers are not modelled")
    table = POINTEE_TYPES if pointer else SCALAR_TYPES
    if c_type not in table:
        raise LaunchError(f"{what}: parameter {text!r} of type {c_type}{'*' if pointer else ''} is not modelled; "
                          f"add it to tests/fake_cupy.py")
    return Parameter(name, c_type, bool(pointer))


@functools.lru_cache(maxsize=None)
def kernel_signature(filename, expression):
    """The KernelSignature of `expression` ("name" or "name<args>") in kernels/<filename>."""
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:<(.*)>)?\s*", expression)
    if m is None:
        raise LaunchError(f"{filename}: {expression!r} is not a kernel name expression")
    name, arguments = m.group(1), m.group(2)
    definitions, constants = _parsed_source(filename)
    found = definitions.get(name, [])
    what = f"kernels/{filename}: {expression}"
    if len(found) != 1:
        raise LaunchError(f"{what}: {len(found)} __global__ definitions of {name!r} found (expected one)")
    template, extern_c, bounds, parameter_text, body = found[0]
    type_arguments, template_values = {}, {}
    if template is None:
        if arguments is not None:
            raise LaunchError(f"{what}: template arguments for a kernel that is not a template")
        if not extern_c:
            raise LaunchError(f"{what}: a kernel launched by its plain name must be extern \"C\" (NVRTC mangles it)")
    else:
        if arguments is None:
            raise LaunchError(f"{what}: a template kernel needs its template arguments in the name expression")
        declared = _split_top_level(template)
        given = _split_top_level(arguments)
        if len(declared) != len(given):
            raise LaunchError(f"{what}: {len(given)} template arguments for <{template}>")
        for declaration, argument in zip(declared, given):
            words = declaration.split()
            if words[0] in ("typename", "class"):
                if argument not in POINTEE_TYPES and argument not in SCALAR_TYPES:
                    raise LaunchError(f"{what}: template type argument {argument!r} is not a modelled C type")
                type_arguments[words[-1]] = argument
            elif words[0] == "bool":
                if argument not in ("true", "false"):
                    raise LaunchError(f"{what}: bool template argument {argument!r} must be true or false")
                template_values[words[-1]] = 1 if argument == "true" else 0
            else:
                try:
                    template_values[words[-1]] = int(argument)
                except ValueError:
                    raise LaunchError(f"{what}: template argument {argument!r} for {declaration!r} is not an "
                                      f"integer literal") from None
    parameters = [_parse_parameter(p, type_arguments, what) for p in _split_top_level(parameter_text)]
    launch_bounds = None
    if bounds is not None:
        first = _split_top_level(bounds)[0]  # maxThreadsPerBlock; the rest are occupancy hints
        launch_bounds = _evaluate(first, {**constants, **template_values}, f"{what}: __launch_bounds__")
    # Local constexprs (BM = TY * RM, SMEM = ...) of this body take precedence over same-named ones elsewhere.
    local = {n: v.strip() for n, v in re.findall(
        r"constexpr\s+(?:unsigned\s+)?(?:int|long long|long)\s+([A-Za-z_]\w*)\s*=\s*([^;]+);", body)}
    static_shared = _static_shared_bytes(body, {**constants, **local, **template_values}, what)
    return KernelSignature(filename, expression, parameters, extern_c, launch_bounds,
                           re.search(r"extern\s+__shared__", body) is not None, static_shared, template_values)


# Pointer parameters that deliberately take memory of another type. The rasterizer keeps its 64-bit
# depth keys (unsigned long long) in the float32 bary output, (B, H, W, 2): 8 bytes a pixel; the resolve
# pass reads a pixel's key, then overwrites it with the pixel's barycentrics (fastface/ops/rasterize.py,
# _rasterize_gpu), so a call allocates only its outputs.
ALIASED_POINTERS = {
    ("rasterize.cu", "zbuf"): lambda a: a.dtype == np.float32 and a.ndim >= 1 and a.shape[-1] == 2,
}


def _vector_alignment(signature):
    """{parameter: bytes}: alignments that vector loads, stores or atomics in the body need beyond the pointee's."""
    f, name = signature.filename, signature.expression.split("<")[0]
    t = signature.template_values
    element = {p.name: np.dtype(POINTEE_TYPES[p.c_type][0]).itemsize for p in signature.parameters if p.pointer}

    def pack(names, count):  # Pack<T, count> is alignas(sizeof(T) * count)
        return {n: element[n] * count for n in names} if count > 1 else {}

    if f == "nn_conv.cu":
        if name in ("im2col_fwd", "im2col_fwd_rows"):
            return pack(("x", "cols"), t["V"])
        if name == "im2col_bwd":
            return pack(("x", "grad_cols", "grad_x"), t["V"])
        if name == "im2col_fwd_patch":  # float4 loads of x, Pack<TOut, 4> stores
            return pack(("x", "cols"), 4)
    if f == "nn_conv_implicit.cu":  # Half8 (alignas(16)) loads of x and w, stores of z
        return {"x": 16, "w": 16, "z": 16}
    if f in ("interpolate.cu", "rasterize.cu") and name in ("interpolate_bwd", "rasterize_interpolate_bwd"):
        # scatter_weighted_vector: float4 atomics into (..., V, 4) rows for C = 3 or 4, float2 for C = 2
        # (interpolate.cu: float4 only).
        C = t["C"]
        if C in (3, 4):
            return {"grad_attr": 16}
        if C == 2 and f == "rasterize.cu":
            return {"grad_attr": 8}
    return {}


def _check_dims(values, what, limits, name):
    if not isinstance(values, tuple) or not 1 <= len(values) <= 3:
        raise LaunchError(f"{what}: {name} must be a tuple of 1 to 3 ints; got {values!r}")
    for axis, (v, limit) in enumerate(zip(values, limits)):
        if type(v) is not int:
            raise LaunchError(f"{what}: {name}[{axis}] must be a Python int; got {type(v).__name__} {v!r}")
        if not 1 <= v <= limit:
            raise LaunchError(f"{what}: {name}[{axis}] = {v} is outside [1, {limit}]")


def _check_argument(signature, index, parameter, argument, what, alignments):
    where = f"{what}: argument {index} ({parameter!r})"
    if parameter.pointer:
        if argument is NULL_POINTER:
            return
        if argument is None:
            raise LaunchError(f"{where}: Python None; CuPy passes it as a garbage pointer (cupy/cupy#9046): pass "
                              f"fastface._backend.NULL_POINTER for a null pointer")
        if not isinstance(argument, ndarray):
            raise LaunchError(f"{where}: a pointer parameter needs a cupy array (or NULL_POINTER); got "
                              f"{type(argument).__module__}.{type(argument).__name__} {argument!r}"[:400])
        dtype, alignment = POINTEE_TYPES[parameter.c_type]
        aliased = ALIASED_POINTERS.get((signature.filename, parameter.name))
        if argument.dtype != dtype and not (aliased is not None and aliased(argument)):
            raise LaunchError(f"{where}: a {parameter.c_type}* takes {np.dtype(dtype)} memory; got "
                              f"{argument.dtype} {argument.shape}")
        if not argument.flags.c_contiguous:
            raise LaunchError(f"{where}: the kernel indexes flat memory; got a non-contiguous array with strides "
                              f"{argument.strides}")
        alignment = max(alignment, alignments.get(parameter.name, 1))
        address = argument.data.ptr
        if argument.size and address % alignment:
            raise LaunchError(f"{where}: needs {alignment}-byte aligned memory; got address {address:#x}")
        if argument.size and argument.nbytes % POINTEE_TYPES[parameter.c_type][1]:
            raise LaunchError(f"{where}: {argument.nbytes} bytes are not whole {parameter.c_type} elements")
        return
    expected = SCALAR_TYPES[parameter.c_type]
    if type(argument) is not expected:
        hint = {int: " (CuPy packs a Python int as 8 bytes)", float: " (CuPy packs a Python float as a double)",
                bool: " (CuPy packs a Python bool as 1 byte)"}.get(type(argument), "")
        if isinstance(argument, np.ndarray):
            hint = " (an array is passed as a pointer)"
        raise LaunchError(f"{where}: a {parameter.c_type} takes a {expected.__name__}; got {type(argument).__name__} "
                          f"{argument!r}{hint}"[:400])


class LaunchChecker:
    """What `KernelFile(...)(name)` returns while the fake is installed: checks and records launches."""

    def __init__(self, gpu, kernel_file, expression):
        self.gpu, self.kernel_file, self.expression = gpu, kernel_file, expression
        self.signature = kernel_signature(kernel_file.filename, expression)

    def __call__(self, grid, block, args, **options):
        s = self.signature
        what = f"kernels/{s.filename}: {s.expression}"
        unknown = set(options) - {"shared_mem"}
        if unknown:
            raise LaunchError(f"{what}: launch options {sorted(unknown)} are not modelled by tests/fake_cupy.py")
        _check_dims(grid, what, (_MAX_GRID_X, _MAX_GRID_YZ, _MAX_GRID_YZ), "grid")
        _check_dims(block, what, _MAX_BLOCK, "block")
        threads = int(np.prod(block))
        if threads > _MAX_THREADS:
            raise LaunchError(f"{what}: block {block} has {threads} threads; at most {_MAX_THREADS}")
        if s.launch_bounds is not None and threads > s.launch_bounds:
            raise LaunchError(f"{what}: block {block} has {threads} threads, more than its __launch_bounds__("
                              f"{s.launch_bounds}): the launch would fail")
        shared = options.get("shared_mem", 0)
        if type(shared) is not int or not 0 <= shared <= _MAX_SHARED:
            raise LaunchError(f"{what}: shared_mem must be an int in [0, {_MAX_SHARED}]; got {shared!r}")
        if shared and not s.dynamic_shared:
            raise LaunchError(f"{what}: shared_mem={shared} for a kernel with no extern __shared__ memory")
        if s.static_shared + shared > _MAX_SHARED:
            raise LaunchError(f"{what}: {s.static_shared} bytes of static and {shared} of dynamic shared memory exceed "
                              f"the {_MAX_SHARED} a block gets without opting in")
        if not isinstance(args, tuple):
            raise LaunchError(f"{what}: args must be a tuple; got {type(args).__name__}")
        if len(args) != len(s.parameters):
            raise LaunchError(f"{what}: {len(args)} arguments for {len(s.parameters)} parameters {s!r}")
        alignments = _vector_alignment(s)
        for i, (parameter, argument) in enumerate(zip(s.parameters, args)):
            _check_argument(s, i, parameter, argument, what, alignments)
        self.gpu.launches.append((s.filename, s.expression, grid, block))
        _device_work.append(f"kernel {s.expression}")
        if self.gpu.compute:
            self._compute(grid, block, args, what)

    def _compute(self, grid, block, args, what):
        _device_op(lambda: self._run(grid, block, args, what))  # in a capture, each replay runs it

    def _run(self, grid, block, args, what):
        from tests import emulated_kernels  # noqa: PLC0415 - it imports this module

        s = self.signature
        if not emulated_kernels.emulation(s.filename, s.expression).runs:
            self.gpu.check_only.append((s.filename, s.expression))
            return
        emulated_kernels.launch(self.kernel_file, s.expression, grid, block, args)
        for i, (parameter, argument) in enumerate(zip(s.parameters, args)):
            if parameter.pointer and isinstance(argument, ndarray):
                _check_red_zones(argument, f"{what}: argument {i} ({parameter!r})")
        self.gpu.computed.append((s.filename, s.expression))


# ---------------------------------------------------------------------------------------------
# cuBLAS

_CUBLAS_TYPES = {0: np.float32, 1: np.float64, 2: np.float16}  # cudaDataType_t: R_32F, R_64F, R_16F
_CUBLAS_COMPUTE = {68: "32F", 70: "64F", 77: "32F_FAST_TF32"}


def _int_argument(name, v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -2 ** 31 <= int(v) < 2 ** 31:
        raise LaunchError(f"{what}: {name} must be a C int; got {type(v).__name__} {v!r}")
    return int(v)


def _address_argument(name, v, what):
    if isinstance(v, ctypes.c_void_p):
        v = v.value
    if type(v) is not int or v == 0:
        raise LaunchError(f"{what}: {name} must be a nonzero address (an int or ctypes.c_void_p); got {v!r}")
    return v


class _FakeCublasLib:
    def __init__(self, gpu):
        self.gpu = gpu

    def cublasGemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,  # noqa: N802,N803
                     beta, C, Ctype, ldc, compute_type, algo):
        what = "cublasGemmEx"
        if handle is not FakeCublas.HANDLE:
            raise LaunchError(f"{what}: handle {handle!r} was not made by this cuBLAS")
        transa, transb, m, n, k, lda, ldb, ldc, Atype, Btype, Ctype, compute_type, algo = (
            _int_argument(name, v, what) for name, v in (
                ("transa", transa), ("transb", transb), ("m", m), ("n", n), ("k", k), ("lda", lda), ("ldb", ldb),
                ("ldc", ldc), ("Atype", Atype), ("Btype", Btype), ("Ctype", Ctype), ("computeType", compute_type),
                ("algo", algo)))
        if transa not in (0, 1) or transb not in (0, 1) or min(m, n, k) < 0:
            raise LaunchError(f"{what}: transa={transa}, transb={transb}, m={m}, n={n}, k={k}")
        if Atype not in _CUBLAS_TYPES or Btype != Atype or Ctype not in _CUBLAS_TYPES:
            raise LaunchError(f"{what}: data types A={Atype}, B={Btype}, C={Ctype}")
        a_t, c_t = _CUBLAS_TYPES[Atype], _CUBLAS_TYPES[Ctype]
        compute = _CUBLAS_COMPUTE.get(compute_type)
        allowed = {np.float64: {"64F"}, np.float32: {"32F", "32F_FAST_TF32"}, np.float16: {"32F"}}[a_t]
        if compute not in allowed or not (c_t == a_t or (a_t == np.float16 and c_t == np.float32)):
            raise LaunchError(f"{what}: compute type {compute_type} with A {np.dtype(a_t)} and C {np.dtype(c_t)}")
        # Column-major: op(A) is m x k, op(B) k x n, C m x n.
        a_rows, a_cols = (m, k) if transa == 0 else (k, m)
        b_rows, b_cols = (k, n) if transb == 0 else (n, k)
        for name, ld, rows in (("lda", lda, a_rows), ("ldb", ldb, b_rows), ("ldc", ldc, m)):
            if ld < max(1, rows):
                raise LaunchError(f"{what}: {name}={ld} is below the {rows} rows of its matrix")
        # Host scalars (pointer mode host) of the compute precision.
        scalar = np.dtype(np.float64 if compute == "64F" else np.float32)
        alpha_v, beta_v = (
            np.frombuffer((ctypes.c_char * scalar.itemsize).from_address(_address_argument(name, v, what)),
                          dtype=scalar, count=1)[0]
            for name, v in (("alpha", alpha), ("beta", beta)))
        c_matrix = self._matrix(C, c_t, m, n, ldc, "C")
        if m == 0 or n == 0:
            return 0
        a_matrix = self._matrix(A, a_t, a_rows, a_cols, lda, "A")
        b_matrix = self._matrix(B, a_t, b_rows, b_cols, ldb, "B")
        op_a = a_matrix.T if transa else a_matrix
        op_b = b_matrix.T if transb else b_matrix

        def multiply():  # the scalars as they were at the call (a graph records them), the matrices as they are
            product = alpha_v * (op_a.astype(np.float64) @ op_b.astype(np.float64))
            if beta_v != 0:
                product = product + beta_v * c_matrix.astype(np.float64)
            c_matrix[...] = product

        _device_op(multiply)
        self.gpu.gemm_calls.append((np.dtype(a_t).name, np.dtype(c_t).name, compute, m, n, k))
        _device_work.append("gemm")
        return 0

    def _matrix(self, address, dtype, rows, cols, ld, name):
        """A numpy view of the column-major rows x cols matrix at `address` with leading dimension ld."""
        address = _address_argument(name, address, "cublasGemmEx")
        item = np.dtype(dtype).itemsize
        if address % item:
            raise LaunchError(f"cublasGemmEx: {name} at {address:#x} is not aligned to its {item}-byte elements")
        extent = (ld * (cols - 1) + rows) * item if rows and cols else 0
        flat, offset = _allocation_of(address, extent, f"cublasGemmEx: matrix {name} ({rows} x {cols}, ld {ld})")
        return np.ndarray((rows, cols), dtype=dtype, buffer=flat, offset=offset, strides=(item, ld * item))


class FakeCublas:
    """Stands in for fastface._gemm._CublasLibrary."""

    HANDLE = ctypes.c_void_p(0xCB1A5)

    def __init__(self, gpu):
        self.lib = _FakeCublasLib(gpu)

    def handle(self, cupy, stream):
        if type(stream) is not int:
            raise LaunchError(f"cuBLAS handle: stream must be an int (cudaStream_t); got {stream!r}")
        return FakeCublas.HANDLE

    @staticmethod
    def check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cublasStatus_t {status}")


# ---------------------------------------------------------------------------------------------
# Installation

class FakeGpu:
    """What `install` returns: the fake module and what ran on the fake GPU."""

    def __init__(self):
        self.cupy = _fake_module()
        self.launches = []    # (filename, name expression, grid, block) of every launch, in order
        self.gemm_calls = []  # (A dtype, C dtype, compute type, m, n, k) of every cublasGemmEx
        self.compute = False  # compute mode (install(..., compute=True)): emulatable kernels run on the host
        self.computed = []    # (filename, name expression) of every launch that ran, in compute mode
        self.check_only = []  # ... and of every launch that was only checked (its kernel cannot be emulated)

    @property
    def device_work(self):
        """Every operation that would be GPU work on real cupy, in order (see _device_work)."""
        return sys.modules[__name__]._device_work

    def kernels(self):
        """The (filename, name expression) pairs launched so far."""
        return {(f, n) for f, n, _, _ in self.launches}

    def clear(self):
        self.launches.clear()
        self.gemm_calls.clear()
        self.computed.clear()
        self.check_only.clear()


def import_all_fastface_modules():
    """Imports every fastface module: each declares its KernelFile and binds cupy_or_none at import."""
    for module in pkgutil.walk_packages(fastface.__path__, "fastface."):
        if module.name != "fastface.__main__":
            importlib.import_module(module.name)


def install(monkeypatch, compute=False):
    """Installs the fake cupy for the current test (undone by `monkeypatch` at its end); returns a FakeGpu.

    compute: run the kernels that tests/emulated_kernels.py can emulate (see the module docstring);
    by default launches are checked and recorded only.
    """
    # Imported before patching: a module first imported now would bind the fake cupy_or_none for good.
    import_all_fastface_modules()
    from fastface import _device_checks  # noqa: PLC0415
    from fastface import _gemm  # noqa: PLC0415

    gpu = FakeGpu()
    gpu.compute = bool(compute)
    real_cupy_or_none = _backend.cupy_or_none
    monkeypatch.setitem(sys.modules, "cupy", gpu.cupy)
    for name, module in list(sys.modules.items()):
        if (name == "fastface" or name.startswith("fastface.")) and \
                getattr(module, "cupy_or_none", None) is real_cupy_or_none:
            monkeypatch.setattr(module, "cupy_or_none", lambda: gpu.cupy)
    monkeypatch.setattr(KernelFile, "__call__", lambda kernel_file, name: _lookup(gpu, kernel_file, name))
    monkeypatch.setattr(_device_checks, "_record", None)  # the next record is made in fake pinned memory
    fake_cublas = FakeCublas(gpu)
    monkeypatch.setattr(_gemm, "_cublas", lambda: fake_cublas)
    monkeypatch.setattr(sys.modules[__name__], "_allocations", {})
    monkeypatch.setattr(sys.modules[__name__], "_device_work", [])
    monkeypatch.setattr(sys.modules[__name__], "_guards", {})
    monkeypatch.setattr(sys.modules[__name__], "_guard_allocations", bool(compute))
    monkeypatch.setattr(sys.modules[__name__], "_current_stream", [Stream(null=True)])
    monkeypatch.setattr(sys.modules[__name__], "_captures", [])
    return gpu


def _lookup(gpu, kernel_file, name):
    if name not in kernel_file.kernels:  # what the real KernelFile.__call__ raises
        raise KeyError(f"kernel {name!r} is not declared for kernels/{kernel_file.filename}; declared: "
                       f"{', '.join(kernel_file.kernels)}")
    return LaunchChecker(gpu, kernel_file, name)


def misaligned(cp, a):
    """A C-contiguous fake array holding a's values at an address 4 bytes past a 16-byte boundary (a view
    into a larger array, as a caller's slice can be): the GPU paths must copy it before float4 loads."""
    flat = cp.empty(a.size + 1, a.dtype)
    view = flat[1:].reshape(a.shape)
    view[...] = cp.asarray(a)
    assert view.data.ptr % 16 == 4 and view.flags.c_contiguous
    return view


def strided(cp, a):
    """A non-contiguous fake view holding a's values."""
    wide = cp.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = cp.asarray(a)
    assert not wide[..., ::2].flags.c_contiguous
    return wide[..., ::2]


# ---------------------------------------------------------------------------------------------
# Comparisons of a computed fake-GPU result with the CPU path (tests/test_gpu_paths_emulated*.py)

def assert_all_computed(gpu, *expected):
    """Every launch since the last clear ran on the host (none was only checked, so no output is garbage),
    the kernels named in `expected` among them; then clears the record. Reads the value checks first: a
    failure there would be a bad input of the test's own."""
    import fastface  # noqa: PLC0415
    fastface.check_device_errors()
    assert gpu.computed, "no kernel ran"
    assert not gpu.check_only, f"launches that were only checked, their outputs garbage: {sorted(set(gpu.check_only))}"
    names = {name.split("<")[0] for _, name in gpu.computed}
    assert set(expected) <= names, (expected, sorted(names))
    gpu.clear()


def _same_layout(got, want):
    assert isinstance(got, ndarray), f"expected a (fake) cupy array; got {type(got)}"
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)


def assert_equal(got, want):
    _same_layout(got, want)
    np.testing.assert_array_equal(got.get(), want)


def assert_close(got, want, tol):
    """Within the GPU-vs-CPU tolerances of tests/conftest.py."""
    _same_layout(got, want)
    np.testing.assert_allclose(got.get(), want, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])


def assert_scatter_close(got, want, tol):
    """Sums of many terms in another order (atomics): relative to the largest entry (tests/ops/test_rasterize.py)."""
    _same_layout(got, want)
    assert np.abs(want).max() > 0, "a zero reference checks nothing"
    np.testing.assert_allclose(got.get(), want, rtol=tol["gpu_cpu_scatter_rtol"],
                               atol=tol["gpu_cpu_scatter_atol_of_max"] * np.abs(want).max())
