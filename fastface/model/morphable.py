"""The morphable model's linear map and its backward: out = mean + (coefficients * std) @ basis.

`FaceModel.evaluate` and `FaceModel.evaluate_backward` call these twice each (geometry, albedo).
The basis is (K, N) float32 row-major, N = 3V; its K rows are scaled by two coefficient blocks
(B, n_a) and (B, n_b), K = n_a + n_b (the geometry basis stacks the shape rows, then the
expression rows, so that one pass over the basis makes the vertices).

Backends. On the GPU, `kernels/morphable.cu` holds `morphable_fwd` and `morphable_bwd`, tiled GEMMs
that read the basis once per call, and for batches up to 8 `morphable_fwd_gemv` / `morphable_bwd_gemv`
(matrix-vector shaped: they stream the basis into registers with many loads in flight, since a
batch of 1 does ~2 flops per 4-byte basis value and is bound by memory latency and bandwidth;
on an H200 at batch 1 the forward took 40 us against the tiled kernel's 91, the backward 46 against
166); the tiled <2, 4> forward remains for small batches whose coefficients do not fit the gemv
kernel's shared memory. A tensor-core forward for larger batches (3xTF32 mma.sync, float32-level
accuracy) measured slower than the tiled one on an H200 (302 vs 260 us at batch 64) and was
removed. Above batch 8 a GEMM may go to cuBLAS instead (with two small kernels of kernels/morphable.cu
around it: the scaled coefficients, the backward's split and scale): in TF32 (a training run's
`FaceModel.to(..., precision="tf32")`) both ways, in float32 the backward only, as measured on an H200
at batch 64 (`_LARGE_BATCH_PATH`; both paths are tested, `bench/profile_morphable.py` times them).
On the CPU the same two functions with the same argument order call BLAS through numpy's
matmul instead of a Numba loop: for these shapes (K ~ 10^2 rows of N ~ 10^5) a BLAS GEMM measured
3-6x faster than a parallel Numba loop over column tiles (batch 1: 8 ms vs 22 ms, batch 64: 0.10 s
vs 0.63 s, 144 x 104,211 float32 on 2 cores), so a Numba twin would only be slower. The CPU path also accepts float64 coefficients (computed in float64, for
gradient checks); the GPU path takes float32 only.
"""
import numpy as np

from fastface._backend import KernelFile, grid_1d, is_cupy_array
from fastface._gemm import gemm

__all__ = ["morphable", "morphable_backward"]

# The tiled kernels: <8, 8> (a 64-row batch tile) above _SMALL_BATCH; <2, 4> (an 8-row tile) for
# the small-batch forwards whose coefficient table does not fit the gemv kernel's shared memory.
_FWD = {False: "morphable_fwd<8, 8>", True: "morphable_fwd<2, 4>"}
_BWD = "morphable_bwd<8, 8>"
_GEMV_ROWS = (1, 2, 4, 8)  # batch rows of the morphable_*_gemv<RM> instantiations
_SMALL_BATCH = 8  # batches up to this use the gemv kernels, larger ones the 64-row tile
_TILE_N = 128     # forward: columns per block (kernels/morphable.cu TILE_N)
_TILE_KB = 128    # backward: basis rows per block (TILE_KB)
_GEMV_COLS = 128  # gemv forward: columns per block (32 lanes x GEMV_COLS)
_GEMV_CHUNK = 1024  # gemv backward: columns per block (GEMV_CHUNK)
_GEMV_ROWS_PER_BLOCK = 16  # gemv backward: basis rows per block (GEMV_ROWS)
# The gemv forward's dynamic shared memory (4 * K * rows bytes of scaled coefficients) beside its
# 28 KB of static partial sums stays under the 48 KB a launch gets without opting in.
_GEMV_COEFF_BYTES = 16384


# Batches above _SMALL_BATCH: "cublas" (cuBLAS GEMM between morphable_scale_coefficients and
# morphable_split_gradient) or "tiled" (morphable_fwd<8, 8> / morphable_bwd<8, 8>); both are tested. None
# (the default) takes what was measured faster on an H200 at batch 64 (bench/RESULTS.md, GPU run 7): in
# float32 the tiled forward (266.9 us against cuBLAS SGEMM's 378.4) and the cuBLAS backward (297.8 against
# 315.8); in TF32 (a training run's precision) cuBLAS both ways, with which the whole step measured 3.49 ms.
_LARGE_BATCH_PATH = None


def _use_cublas(compute, backward):
    """Whether a batch above _SMALL_BATCH goes through cuBLAS (see _LARGE_BATCH_PATH)."""
    if _LARGE_BATCH_PATH is not None:
        return _LARGE_BATCH_PATH == "cublas"
    return compute == "tf32" or backward


_GPU_NAMES = tuple(_FWD.values()) + (_BWD,) + tuple(
    f"morphable_{d}_gemv<{r}>" for d in ("fwd", "bwd") for r in _GEMV_ROWS) + (
    "morphable_scale_coefficients", "morphable_split_gradient")


_kernel = KernelFile("morphable.cu", _GPU_NAMES)


def _gemv_rows(batch):
    """The smallest instantiated RM >= batch."""
    return next(r for r in _GEMV_ROWS if r >= batch)


# ----------------------------------------------------------------------------------------------
# CPU: BLAS through numpy (see the module docstring for why not Numba)
# ----------------------------------------------------------------------------------------------

def _morphable_fwd_cpu(coeff_a, coeff_b, std_dev, basis, mean, out):
    scaled = np.concatenate([coeff_a, coeff_b], axis=1) * std_dev.astype(out.dtype)
    if scaled.shape[1] == 0:
        out[:] = mean
        return
    np.matmul(scaled, basis.astype(out.dtype, copy=False), out=out)
    out += mean


def _morphable_bwd_cpu(std_dev, basis, grad_out, grad_a, grad_b):
    n_a = grad_a.shape[1]
    if basis.shape[0] == 0:
        return
    full = (grad_out @ basis.astype(grad_out.dtype, copy=False).T) * std_dev.astype(grad_out.dtype)
    grad_a[:] = full[:, :n_a]
    grad_b[:] = full[:, n_a:]


# ----------------------------------------------------------------------------------------------
# GPU: kernels/morphable.cu
# ----------------------------------------------------------------------------------------------

def _morphable_fwd_gpu(coeff_a, coeff_b, std_dev, basis, mean, out, compute="float32"):
    batch, n = out.shape
    n_a, n_b = coeff_a.shape[1], coeff_b.shape[1]
    small = batch <= _SMALL_BATCH
    if not small and _use_cublas(compute, backward=False):
        import cupy  # noqa: PLC0415
        n_k = n_a + n_b
        out[...] = mean  # the GEMM adds into it (beta = 1)
        if n_k:
            scaled = cupy.empty((batch, n_k), dtype=cupy.float32)
            _kernel("morphable_scale_coefficients")(*grid_1d(batch * n_k), (
                coeff_a, coeff_b if n_b else coeff_a, std_dev, scaled, np.int32(batch), np.int32(n_a), np.int32(n_b)))
            gemm(scaled, basis, out, beta=1.0, compute=compute)
        return
    args = (coeff_a, coeff_b if n_b else coeff_a, std_dev, basis, mean, out,
            np.int32(batch), np.int32(n_a), np.int32(n_b), np.int64(n))
    if small and 4 * (n_a + n_b) * _gemv_rows(batch) <= _GEMV_COEFF_BYTES:
        rows = _gemv_rows(batch)
        _kernel(f"morphable_fwd_gemv<{rows}>")(
            ((n + _GEMV_COLS - 1) // _GEMV_COLS, 1, 1), (256, 1, 1), args, shared_mem=4 * (n_a + n_b) * rows)
        return
    _kernel(_FWD[small])(((n + _TILE_N - 1) // _TILE_N, 1, 1), (32, 2 if small else 8, 1), args)


def _morphable_bwd_gpu(std_dev, basis, grad_out, grad_a, grad_b, compute="float32"):
    batch, n = grad_out.shape
    n_a, n_b = grad_a.shape[1], grad_b.shape[1]
    n_k = n_a + n_b
    if n_k == 0:
        return
    if batch > _SMALL_BATCH and _use_cublas(compute, backward=True):
        import cupy  # noqa: PLC0415
        full = cupy.empty((batch, n_k), dtype=cupy.float32)
        gemm(grad_out, basis, full, trans_b=True, compute=compute)
        _kernel("morphable_split_gradient")(*grid_1d(batch * n_k), (
            full, std_dev, grad_a, grad_b if n_b else grad_a, np.int32(batch), np.int32(n_a), np.int32(n_b)))
        return
    if batch <= _SMALL_BATCH:  # the gemv backward stages grad_out, not the coefficients: any K fits
        kernel = _kernel(f"morphable_bwd_gemv<{_gemv_rows(batch)}>")
        chunk, rows_per_block, block, batch_tiles = _GEMV_CHUNK, _GEMV_ROWS_PER_BLOCK, (256, 1, 1), 1
    else:
        kernel = _kernel(_BWD)
        # Column chunk per block: long enough that the atomics (one per output per block) stay a
        # small fraction of the work, short enough that the grid fills the GPU several times over.
        chunk, rows_per_block, block, batch_tiles = 512, _TILE_KB, (32, 8, 1), (batch + 63) // 64
    grid = ((n + chunk - 1) // chunk, (n_k + rows_per_block - 1) // rows_per_block, batch_tiles)
    kernel(grid, block, (std_dev, basis, grad_out, grad_a, grad_b if n_b else grad_a,
                         np.int32(batch), np.int32(n_a), np.int32(n_b), np.int64(n), np.int32(chunk)))


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------

def morphable(coeff_a, coeff_b, std_dev, basis, mean, *, compute="float32"):
    """mean + concat(coeff_a, coeff_b) * std_dev @ basis.

    Args:
        coeff_a: (B, n_a) float32 (or float64 on the CPU), C-contiguous.
        coeff_b: (B, n_b), same dtype and device; n_b may be 0.
        std_dev: (n_a + n_b,) float32.
        basis: (n_a + n_b, N) float32, C-contiguous.
        mean: (N,) float32.
        compute: keyword only, "float32" or "tf32": the GPU's cuBLAS GEMM above batch 8 (FaceModel.to's
            precision); the kernels and the CPU compute in the coefficients' dtype.

    Returns:
        (B, N) array of the coefficients' dtype.

    Inputs are assumed checked (FaceModel.evaluate checks them).
    """
    xp_gpu = is_cupy_array(coeff_a)
    if xp_gpu:
        import cupy  # noqa: PLC0415
        out = cupy.empty((coeff_a.shape[0], basis.shape[1]), dtype=cupy.float32)
        _morphable_fwd_gpu(coeff_a, coeff_b, std_dev, basis, mean, out, compute)
    else:
        out = np.empty((coeff_a.shape[0], basis.shape[1]), dtype=coeff_a.dtype)
        _morphable_fwd_cpu(coeff_a, coeff_b, std_dev, basis, mean, out)
    return out


def morphable_backward(std_dev, basis, n_a, grad_out, *, compute="float32"):
    """Gradients of <morphable(...), grad_out> with respect to coeff_a and coeff_b.

    Args:
        std_dev: (K,) float32; basis: (K, N) float32; n_a: the size of the first block.
        grad_out: (B, N) float32 (or float64 on the CPU), C-contiguous.
        compute: keyword only, as for `morphable`.

    Returns:
        (grad_a (B, n_a), grad_b (B, K - n_a)) of grad_out's dtype.
    """
    batch, n_k = grad_out.shape[0], basis.shape[0]
    if is_cupy_array(grad_out):
        import cupy  # noqa: PLC0415
        grad_a = cupy.zeros((batch, n_a), dtype=cupy.float32)  # atomicAdd targets
        grad_b = cupy.zeros((batch, n_k - n_a), dtype=cupy.float32)
        _morphable_bwd_gpu(std_dev, basis, grad_out, grad_a, grad_b, compute)
    else:
        grad_a = np.zeros((batch, n_a), dtype=grad_out.dtype)
        grad_b = np.zeros((batch, n_k - n_a), dtype=grad_out.dtype)
        _morphable_bwd_cpu(std_dev, basis, grad_out, grad_a, grad_b)
    return grad_a, grad_b
