"""Builds CUDA sources for the host, so that tests can run the kernels' own code without a GPU.

A test writes a C++ shim that defines the CUDA built-ins it needs (threadIdx, blockIdx, atomics...),
includes a kernels/*.cu file and exports C entry points that call the kernels over an emulated grid.
The shim is compiled with the host compiler into a shared library loaded through ctypes. This checks
the kernels' arithmetic, indexing and argument order, not the GPU's scheduling or CuPy's packing.
"""
import ctypes
import pathlib
import shutil
import subprocess

import pytest

KERNEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels"


def build_emulated_library(build_dir, shim, extra_flags=()):
    """Compiles `shim` (C++ source text) in `build_dir` against kernels/ and loads it; skips without g++."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to emulate the CUDA sources")
    source, lib = pathlib.Path(build_dir) / "emu.cpp", pathlib.Path(build_dir) / "libemu.so"
    source.write_text(shim)
    result = subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-Wno-unknown-pragmas", *extra_flags,
                             f"-I{KERNEL_DIR}", str(source), "-o", str(lib)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(lib))
