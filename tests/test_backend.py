"""The dispatch helpers: kernel lookup once per file, name and device; device mixing refused."""
import types

import numpy as np
import pytest

from fastface import _backend


class _FakeModule:
    def __init__(self, filename, name_expressions, options, log):
        self.filename, self.name_expressions, self.options, self.log = filename, name_expressions, options, log

    def get_function(self, name):
        self.log.append(("get_function", self.filename, name))
        return (self.filename, name, self.name_expressions, self.options)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A stand-in for cupy's device query and the module compiler, recording every call."""
    log, device = [], {"id": 0}
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: device["id"])))
    monkeypatch.setattr(_backend, "cupy_or_none", lambda: fake_cupy)
    monkeypatch.setattr(_backend, "cuda_module",
                        lambda filename, name_expressions=(), options=(): _FakeModule(
                            filename, name_expressions, options, log))
    return log, device


def test_kernel_file_looks_each_kernel_up_once_per_device(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backend.KernelFile, "declared", [])
    log, device = fake_gpu
    raster = _backend.KernelFile("rasterize.cu", ["rasterize_fwd", "rasterize_bwd", "a<1>"], ("--fmad=false",))
    first, again = raster("rasterize_fwd"), raster("rasterize_fwd")
    assert first is again and len(log) == 1
    assert first == ("rasterize.cu", "rasterize_fwd", ("a<1>",), ("--fmad=false",)), \
        "template instances are the name expressions; the options are the file's"
    raster("rasterize_bwd")
    _backend.KernelFile("interpolate.cu", ["rasterize_fwd"])("rasterize_fwd")
    assert len(log) == 3, "another kernel name or another file is another lookup"
    device["id"] = 1
    raster("rasterize_fwd")
    assert len(log) == 4, "another device compiles and looks up its own kernel"
    assert [k.filename for k in _backend.KernelFile.declared] == ["rasterize.cu", "interpolate.cu"]


def test_kernel_file_refuses_an_undeclared_kernel(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backend.KernelFile, "declared", [])
    with pytest.raises(KeyError, match="'rasterize_fwd' is not declared for kernels/normals.cu"):
        _backend.KernelFile("normals.cu", ["vertex_normals_fwd"])("rasterize_fwd")


def test_array_module_refuses_numpy_mixed_with_cupy():
    class FakeCupyArray:
        __module__ = "cupy._core.core"

    with pytest.raises(TypeError, match="pos is a numpy array but attr is a cupy array"):
        _backend.array_module(("pos", np.zeros(3)), ("attr", FakeCupyArray()))
    assert _backend.array_module(("pos", np.zeros(3)), ("attr", None)) is np


def test_an_absent_pointer_is_an_eight_byte_zero_not_none():
    # CuPy packs numpy integers by size; None would reach the kernel as a garbage address.
    null = _backend.pointer_or_null(None)
    assert isinstance(null, np.integer) and null.itemsize == 8 and int(null) == 0
    array = np.zeros(2)
    assert _backend.pointer_or_null(array) is array
