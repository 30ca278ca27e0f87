"""The row-major GEMM helper: every transpose, alpha/beta, row slices, and cuBLAS against numpy."""
import types
import weakref

import numpy as np
import pytest

from fastface._gemm import gemm


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
    from fastface import _gemm

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


# -- the cuBLAS handle's stream and workspace, against a fake libcublas (runs on the CPU) -------

class _FakeCublasFunction:
    """One libcublas entry point: records its name and arguments (ctypes values unwrapped)."""

    def __init__(self, name, calls, failures):
        self.name, self.calls, self.failures = name, calls, failures

    def __call__(self, *args):
        if self.name == "cublasCreate_v2":
            args[0]._obj.value = 0xB1A5  # the byref(handle) out-parameter
        # ctypes.c_void_p(0).value is None: NULL (the legacy default stream) is recorded as 0
        self.calls.append((self.name, tuple((getattr(a, "value", a) or 0) for a in args)))
        return self.failures.pop(self.name, 0)


class _FakeCublas:
    """Stands in for the CDLL that _CublasLibrary._load opens. failures: name -> status to
    return once."""

    def __init__(self):
        self.calls, self.failures = [], {}

    def __getattr__(self, name):
        if not name.startswith("cublas"):
            raise AttributeError(name)
        function = _FakeCublasFunction(name, self.calls, self.failures)
        setattr(self, name, function)
        return function

    def named(self, name):
        return [args for n, args in self.calls if n == name]


class _FakeDeviceArray:
    """A numpy array dressed as a cupy one (shape, strides, dtype and data.ptr are all gemm reads)."""

    def __init__(self, host):
        self.host = host
        self.dtype, self.shape, self.strides, self.ndim = host.dtype, host.shape, host.strides, host.ndim
        self.data = types.SimpleNamespace(ptr=host.ctypes.data)


class _FakeCupy:
    """The corner of cupy that the ctypes path touches: the current device and stream, empty()."""

    def __init__(self):
        self.stream_ptr = 0x51
        self.allocated = []  # weak references: the test must not keep the workspace alive itself
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDevice=lambda: 0),
            Device=lambda: types.SimpleNamespace(id=0),  # either way of asking for the device
            get_current_stream=lambda: types.SimpleNamespace(ptr=self.stream_ptr))

    def empty(self, shape, dtype):
        array = _FakeDeviceArray(np.empty(shape, dtype=dtype))
        self.allocated.append(weakref.ref(array))
        return array


@pytest.fixture
def fake_cublas(monkeypatch):
    from fastface import _gemm

    lib, cupy = _FakeCublas(), _FakeCupy()
    monkeypatch.setattr(_gemm._CublasLibrary, "_load", staticmethod(lambda: lib))
    monkeypatch.setattr(_gemm, "_cublas_state", {})
    monkeypatch.setattr(_gemm, "cupy_or_none", lambda: cupy)
    monkeypatch.setattr(_gemm, "is_cupy_array", lambda x: isinstance(x, _FakeDeviceArray))
    assert _gemm._cublas() is not None, _gemm._cublas_state.get("error")
    return lib, cupy


def _fake_gemm():
    a, b, out = (_FakeDeviceArray(np.zeros(s, dtype=np.float32)) for s in ((4, 3), (3, 2), (4, 2)))
    gemm(a, b, out)


def test_cublas_stream_is_set_only_when_it_changes_and_always_followed_by_our_workspace(fake_cublas):
    from fastface import _gemm

    lib, cupy = fake_cublas
    streams = [0x51, 0x51, 0x51, 0x52, 0x52, 0x51, 0x0, 0x0]
    for stream in streams:
        cupy.stream_ptr = stream
        _fake_gemm()
    assert [args[1] for args in lib.named("cublasSetStream_v2")] == [0x51, 0x52, 0x51, 0x0]
    assert len(lib.named("cublasGemmEx")) == len(streams)
    # One workspace for the handle's life, from cupy's pool, never a per-call allocation.
    assert len(cupy.allocated) == 1
    workspace = cupy.allocated[0]()
    assert workspace is not None, "the workspace was freed while the handle still uses it"
    assert workspace.host.nbytes == _gemm._CublasLibrary.WORKSPACE_BYTES
    handle = lib.named("cublasGemmEx")[0][0]
    expected_workspace = ("cublasSetWorkspace_v2", (handle, workspace.data.ptr, _gemm._CublasLibrary.WORKSPACE_BYTES))
    for i, (name, args) in enumerate(lib.calls):
        if name == "cublasSetStream_v2":
            assert lib.calls[i + 1] == expected_workspace, "cublasSetStream reset the workspace; it was not set again"
        elif name == "cublasGemmEx":
            assert args[0] == handle
    # every GEMM ran with the handle bound to the stream current at the time
    gemm_streams = []
    bound = None
    for name, args in lib.calls:
        if name == "cublasSetStream_v2":
            bound = args[1]
        elif name == "cublasGemmEx":
            gemm_streams.append(bound)
    assert gemm_streams == streams


def test_cublas_rebinds_after_a_failed_set_workspace(fake_cublas):
    lib, cupy = fake_cublas
    lib.failures["cublasSetWorkspace_v2"] = 7
    with pytest.raises(RuntimeError, match="cublasSetWorkspace_v2 failed with cublasStatus_t 7"):
        _fake_gemm()
    assert lib.named("cublasGemmEx") == []
    _fake_gemm()  # same stream: the handle must not be taken as bound after the failure
    assert len(lib.named("cublasSetStream_v2")) == 2
    assert lib.calls[-2][0] == "cublasSetWorkspace_v2" and lib.calls[-1][0] == "cublasGemmEx"
