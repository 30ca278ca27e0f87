"""Row-major GEMM on numpy (BLAS through np.matmul) and cupy (cuBLAS gemmEx, called through ctypes).

    gemm(a, b, out, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, compute="float32")
    out = alpha * op(a) @ op(b) + beta * out

Why call cuBLAS directly instead of cupy.matmul: it writes into a caller's buffer (no
allocation, so a step can be captured in a CUDA graph), it multiplies float16 operands into a
float32 result with float32 accumulation (cupy.matmul would cast the operands to float32 first),
transposes are free (an operation flag, never a copy), alpha folds a scale into the product (the
fp16 loss scale), beta accumulates, and the compute type selects TF32 tensor cores or not.

It sits beside _backend and _checks, below both of its users: the encoder's layers (fastface/nn) and
the corrective space's decoders (fastface/model/corrective.py).

Row-major to cuBLAS's column-major: a row-major (R, C) matrix with row stride ld is the
column-major (C, R) matrix with leading dimension ld, so out = A B is computed as the
column-major out^T = B^T A^T with the operands swapped and no data moved.
"""
import ctypes
import os

import numpy as np

from fastface._backend import cupy_or_none, is_cupy_array

__all__ = ["gemm", "COMPUTE_MODES"]

# cudaDataType_t (library_types.h) and cublasComputeType_t / cublasOperation_t (cublas_api.h).
_CUDA_R_32F, _CUDA_R_64F, _CUDA_R_16F = 0, 1, 2
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_64F, _CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 70, 77
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_GEMM_DEFAULT = -1
_DATA_TYPES = {np.dtype(np.float16): _CUDA_R_16F, np.dtype(np.float32): _CUDA_R_32F,
               np.dtype(np.float64): _CUDA_R_64F}

COMPUTE_MODES = ("float32", "tf32")


def _leading(name, m):
    """Row stride in elements of a 2-D matrix whose rows are contiguous."""
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got shape {tuple(m.shape)}")
    item = m.dtype.itemsize
    if m.shape[1] > 1 and m.strides[1] != item:
        raise ValueError(f"{name} must have contiguous rows; got strides {m.strides}")
    if m.shape[0] > 1 and (m.strides[0] % item or m.strides[0] // item < m.shape[1]):
        raise ValueError(f"{name} has a row stride that is not a whole number of rows; got {m.strides}")
    return max(m.strides[0] // item if m.shape[0] > 1 else m.shape[1], 1)


def _shapes(a, b, out, trans_a, trans_b):
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb or tuple(out.shape) != (m, n):
        raise ValueError(f"gemm shapes do not agree: op(a) is {(m, k)}, op(b) is {(kb, n)}, "
                         f"out is {tuple(out.shape)}")
    return m, n, k


def gemm(a, b, out, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, compute="float32"):
    """out = alpha * op(a) @ op(b) + beta * out, in place; op is a transpose when asked.

    Args:
        a, b: 2-D arrays with contiguous rows (row slices and transposed reads are fine), both
            numpy or both cupy, of one dtype: float16 (cupy only), float32 or float64.
        out: 2-D array with contiguous rows, the dtype of a or float32 when a is float16.
        alpha, beta: Python floats.
        compute: "float32" (exact float32 products), or "tf32" (TF32 tensor cores for float32
            operands on the GPU; ignored elsewhere). float16 operands always accumulate in
            float32, float64 in float64.

    Returns:
        out.
    """
    m, n, k = _shapes(a, b, out, trans_a, trans_b)
    if not is_cupy_array(a):
        op_a = a.T if trans_a else a
        op_b = b.T if trans_b else b
        if alpha == 1.0 and beta == 0.0 and out.dtype == np.result_type(op_a, op_b):
            np.matmul(op_a, op_b, out=out)
        else:
            product = np.matmul(op_a, op_b)
            if beta == 0.0:
                np.multiply(product, alpha, out=out, casting="unsafe")
            else:
                out *= beta
                out += alpha * product
        return out
    return _gemm_cublas(a, b, out, m, n, k, trans_a, trans_b, alpha, beta, compute)


class _CublasLibrary:
    """cuBLAS called through ctypes, with a handle and a fixed workspace of our own per device.

    Why not CuPy's cuBLAS wrappers: they refuse every call while the current stream is
    capturing a CUDA graph (`cublas.setStream` raises NotImplementedError), although cuBLAS
    itself supports capture once the handle has a workspace set by the caller (then no
    allocation happens inside the GEMM call). So the library CuPy loaded is called directly:
    the same shared object (cuda.pathfinder's cached load, else the path in /proc/self/maps,
    else the soname), with explicit argument types, a handle made here (so CuPy's own handle
    and its stream setting are never touched), and a 32 MiB workspace allocated once from
    CuPy's memory pool, outside any capture, and held as long as the handle (for the process).

    cublasSetStream unconditionally resets the handle's workspace to cuBLAS's default pool
    (memory cuBLAS allocates itself, outside CuPy's pool, and not what a graph should record),
    so the stream is set only when the current stream differs from the one the handle was last
    bound to, and the workspace is set again right after every cublasSetStream. Calls on one
    device share the handle and the workspace, so they must not run concurrently on two streams
    (fastface issues every GEMM on the current stream).
    """

    WORKSPACE_BYTES = 32 << 20

    def __init__(self):
        self.lib = self._load()
        c = ctypes
        L = self.lib
        L.cublasCreate_v2.argtypes = [c.POINTER(c.c_void_p)]
        L.cublasSetStream_v2.argtypes = [c.c_void_p, c.c_void_p]
        L.cublasSetWorkspace_v2.argtypes = [c.c_void_p, c.c_void_p, c.c_size_t]
        L.cublasSetMathMode.argtypes = [c.c_void_p, c.c_int]
        L.cublasSetPointerMode_v2.argtypes = [c.c_void_p, c.c_int]
        L.cublasGemmEx.argtypes = [
            c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_int, c.c_int,
            c.c_void_p, c.c_void_p, c.c_int, c.c_int,
            c.c_void_p, c.c_int, c.c_int,
            c.c_void_p, c.c_void_p, c.c_int, c.c_int,
            c.c_int, c.c_int]
        for f in (L.cublasCreate_v2, L.cublasSetStream_v2, L.cublasSetWorkspace_v2, L.cublasSetMathMode,
                  L.cublasSetPointerMode_v2, L.cublasGemmEx):
            f.restype = c.c_int
        self._handles = {}  # device id -> _HandleState

    @staticmethod
    def _load():
        """The libcublas CuPy uses, opened again (dlopen of a loaded path returns the same object)."""
        paths = []
        try:
            from cuda import pathfinder  # noqa: PLC0415 - CuPy 14 loads its libraries with it

            paths.append(pathfinder.load_nvidia_dynamic_lib("cublas").abs_path)
        except Exception:
            pass
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    path = line.split()[-1] if line.strip() else ""
                    if os.path.basename(path).startswith("libcublas.so"):
                        paths.append(path)
        except OSError:
            pass
        paths += ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
        errors = []
        for path in paths:
            if not path:
                continue
            try:
                return ctypes.CDLL(path)
            except OSError as e:
                errors.append(f"{path}: {e}")
        raise OSError("could not open libcublas: " + "; ".join(errors))

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cublasStatus_t {status}")

    def handle(self, cupy, stream):
        """This device's handle, bound to `stream` (a cudaStream_t as an int) with our workspace.

        The handle and workspace are made on first use (never inside a capture). On the batch-of-one
        path this runs for every GEMM, so the common case is a dict lookup and one comparison.
        """
        dev = cupy.cuda.runtime.getDevice()
        state = self._handles.get(dev)
        if state is None:
            state = self._handles[dev] = self._create(cupy)
        if state.stream != stream:
            self._bind(state, stream)
        return state.handle

    def _create(self, cupy):
        h = ctypes.c_void_p()
        self.check(self.lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate_v2")
        # Referenced by the state, which lives in self._handles as long as the handle: the pool
        # never hands this memory to anyone else while cuBLAS may write to it.
        workspace = cupy.empty(self.WORKSPACE_BYTES, dtype=np.uint8)
        self.check(self.lib.cublasSetPointerMode_v2(h, _CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode_v2")
        self.check(self.lib.cublasSetMathMode(h, _CUBLAS_DEFAULT_MATH), "cublasSetMathMode")
        return _HandleState(h, workspace, self.WORKSPACE_BYTES)

    def _bind(self, state, stream):
        """cublasSetStream, then cublasSetWorkspace again (cublasSetStream dropped it)."""
        state.stream = None  # unknown until both calls succeed: a failure makes the next call retry
        self.check(self.lib.cublasSetStream_v2(state.handle, ctypes.c_void_p(stream)), "cublasSetStream_v2")
        self.check(self.lib.cublasSetWorkspace_v2(state.handle, state.workspace_ptr, state.workspace_size),
                   "cublasSetWorkspace_v2")
        state.stream = stream


class _HandleState:
    """One device's cuBLAS handle, the workspace it computes in, and the stream it is bound to."""

    __slots__ = ("handle", "workspace", "workspace_ptr", "workspace_size", "stream")

    def __init__(self, handle, workspace, size):
        self.handle = handle
        self.workspace = workspace  # the cupy array: keeps the memory alive
        self.workspace_ptr = ctypes.c_void_p(workspace.data.ptr)
        self.workspace_size = ctypes.c_size_t(size)
        self.stream = None  # no stream set yet: the first call binds one


_CUBLAS_POINTER_MODE_HOST = 0
_CUBLAS_DEFAULT_MATH = 0
_cublas_state = {}


def _cublas():
    """The ctypes cuBLAS, or None when it cannot be opened (then CuPy's wrappers are used and
    a CUDA graph capture of a GEMM raises)."""
    if "lib" not in _cublas_state:
        try:
            _cublas_state["lib"] = _CublasLibrary()
        except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
            _cublas_state["lib"] = None
            _cublas_state["error"] = f"{type(e).__name__}: {e}"
    return _cublas_state["lib"]


def _is_capturing(cupy):
    try:
        return bool(cupy.cuda.get_current_stream().is_capturing())
    except Exception:  # noqa: BLE001 - an old CuPy without is_capturing: assume not
        return False


def _gemm_cublas(a, b, out, m, n, k, trans_a, trans_b, alpha, beta, compute):
    cupy = cupy_or_none()
    if a.dtype != b.dtype or a.dtype not in _DATA_TYPES:
        raise TypeError(f"gemm operands must share one of float16, float32, float64; got {a.dtype} and {b.dtype}")
    if out.dtype != a.dtype and not (a.dtype == np.float16 and out.dtype == np.float32):
        raise TypeError(f"gemm output must be {a.dtype} (or float32 for float16 operands); got {out.dtype}")
    if a.dtype == np.float64:
        compute_type, scalar = _CUBLAS_COMPUTE_64F, np.float64
    elif a.dtype == np.float32 and compute == "tf32":
        compute_type, scalar = _CUBLAS_COMPUTE_32F_FAST_TF32, np.float32
    else:
        compute_type, scalar = _CUBLAS_COMPUTE_32F, np.float32
    lda, ldb, ldc = _leading("a", a), _leading("b", b), _leading("out", out)
    if m == 0 or n == 0:
        return out
    # Host scalars (pointer mode host): cuBLAS reads them during the call, and a graph capture
    # records their values.
    alpha_h = np.array(alpha, dtype=scalar)
    beta_h = np.array(beta, dtype=scalar)
    op_a = _CUBLAS_OP_T if trans_a else _CUBLAS_OP_N
    op_b = _CUBLAS_OP_T if trans_b else _CUBLAS_OP_N
    stream = cupy.cuda.get_current_stream().ptr
    lib = _cublas()
    if lib is not None:
        handle = lib.handle(cupy, stream)
        # Column-major: out^T (n x m) = op(b)^T (n x k) @ op(a)^T (k x m).
        lib.check(lib.lib.cublasGemmEx(
            handle, op_b, op_a, n, m, k,
            ctypes.c_void_p(alpha_h.ctypes.data), ctypes.c_void_p(b.data.ptr), _DATA_TYPES[b.dtype], ldb,
            ctypes.c_void_p(a.data.ptr), _DATA_TYPES[a.dtype], lda,
            ctypes.c_void_p(beta_h.ctypes.data), ctypes.c_void_p(out.data.ptr), _DATA_TYPES[out.dtype], ldc,
            compute_type, _CUBLAS_GEMM_DEFAULT), "cublasGemmEx")
        return out
    if _is_capturing(cupy):
        raise RuntimeError("a GEMM cannot be recorded in a CUDA graph: cuBLAS could not be opened through "
                           f"ctypes ({_cublas_state.get('error')}), and CuPy's cuBLAS wrappers refuse "
                           "calls during stream capture")
    from cupy_backends.cuda.libs import cublas  # noqa: PLC0415 - needs the CUDA libraries

    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, stream)
    cublas.gemmEx(
        handle, op_b, op_a, n, m, k,
        alpha_h.ctypes.data, b.data.ptr, _DATA_TYPES[b.dtype], ldb,
        a.data.ptr, _DATA_TYPES[a.dtype], lda,
        beta_h.ctypes.data, out.data.ptr, _DATA_TYPES[out.dtype], ldc,
        compute_type, _CUBLAS_GEMM_DEFAULT)
    return out
