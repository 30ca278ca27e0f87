"""The row-major GEMM helper: every transpose, alpha/beta, row slices, and cuBLAS against numpy."""
import numpy as np
import pytest

from fastface.nn._gemm import gemm


def _operands(rng, m, n, k, trans_a, trans_b, dtype=np.float64):
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    ref = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    return a, b, ref


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_matches_matmul_with_alpha_and_beta(rng, trans_a, trans_b):
    a, b, ref = _operands(rng, 5, 3, 4, trans_a, trans_b)
    out = rng.normal(size=(5, 3))
    expected = 0.5 * ref + 2.0 * out
    np.testing.assert_allclose(gemm(a, b, out, trans_a, trans_b, alpha=0.5, beta=2.0), expected, rtol=1e-13)
    np.testing.assert_allclose(gemm(a, b, np.empty((5, 3)), trans_a, trans_b), ref, rtol=1e-13)


def test_gemm_rejects_disagreeing_shapes(rng):
    with pytest.raises(ValueError, match="gemm shapes do not agree"):
        gemm(np.zeros((2, 3)), np.zeros((4, 5)), np.zeros((2, 5)))


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype,out_dtype,compute", [
    (np.float32, np.float32, "float32"), (np.float64, np.float64, "float32"),
    (np.float16, np.float16, "float32"), (np.float16, np.float32, "float32"), (np.float32, np.float32, "tf32")])
def test_gpu_gemm_matches_numpy(cupy, rng, tol, trans_a, trans_b, dtype, out_dtype, compute):
    m, n, k = 37, 19, 70
    a, b, ref = _operands(rng, m, n, k, trans_a, trans_b, dtype)
    out0 = rng.normal(size=(m, n)).astype(out_dtype)
    got = gemm(cupy.asarray(a), cupy.asarray(b), cupy.asarray(out0), trans_a, trans_b, alpha=0.5, beta=0.25,
               compute=compute).get()
    expected = 0.5 * ref + 0.25 * out0.astype(np.float64)
    # float32: exact products summed in another order; tf32/float16: 10-bit operands or result
    rtol = {np.float64: 1e-12, np.float32: 1e-5}[dtype] if dtype != np.float16 and compute != "tf32" else 1e-2
    scale = 0.5 * np.abs((a.T if trans_a else a).astype(np.float64)) @ np.abs((b.T if trans_b else b).astype(np.float64))
    assert np.all(np.abs(got - expected) <= rtol * (scale + 0.25 * np.abs(out0)) + 1e-6)


def test_gpu_gemm_reads_row_slices(cupy, rng):
    big = cupy.asarray(rng.normal(size=(6, 10)).astype(np.float32))
    a = big[:, :4]          # rows of stride 10
    b = cupy.asarray(rng.normal(size=(4, 3)).astype(np.float32))
    out = cupy.empty((6, 3), dtype=np.float32)
    gemm(a, b, out)
    np.testing.assert_allclose(out.get(), a.get() @ b.get(), rtol=1e-5, atol=1e-5)


def test_gpu_gemm_uses_cublas_through_ctypes(cupy):
    """The ctypes path (needed for graph capture) opened; the CuPy fallback is for emergencies."""
    from fastface.nn import _gemm

    assert _gemm._cublas() is not None, _gemm._cublas_state.get("error")


@pytest.mark.parametrize("dtype,out_dtype,compute", [(np.float32, np.float32, "float32"),
                                                     (np.float16, np.float32, "float32"),
                                                     (np.float32, np.float32, "tf32")])
def test_gpu_gemm_records_in_a_cuda_graph_and_replays_on_new_data(cupy, rng, dtype, out_dtype, compute):
    a = cupy.asarray(rng.normal(size=(300, 70)).astype(dtype))
    b = cupy.asarray(rng.normal(size=(40, 70)).astype(dtype))
    out = cupy.zeros((300, 40), dtype=out_dtype)
    gemm(a, b, out, trans_b=True, alpha=0.5, compute=compute)  # warm-up outside the capture
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            gemm(a, b, out, trans_b=True, alpha=0.5, compute=compute)
        finally:
            graph = stream.end_capture()
    a[...] = cupy.asarray(rng.normal(size=(300, 70)).astype(dtype))
    out[...] = 0
    graph.launch(stream)
    stream.synchronize()
    expected = 0.5 * a.get().astype(np.float64) @ b.get().astype(np.float64).T
    rtol = 1e-5 if dtype == np.float32 and compute == "float32" else 1e-2
    scale = 0.5 * np.abs(a.get().astype(np.float64)) @ np.abs(b.get().astype(np.float64)).T
    assert np.all(np.abs(out.get() - expected) <= rtol * scale + 1e-6)
