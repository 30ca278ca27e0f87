"""Every CUDA source compiles with nvcc for Hopper with all warnings as errors, and every kernel the
library launches exists under the name it is launched by.

Runs wherever nvcc is on the PATH (CI included), so a kernel that no longer compiles, or a misspelt or
missing template instance, is caught on machines without a GPU. NVRTC (what CuPy uses at run time)
accepts a subset of what nvcc does.
"""
import importlib
import pathlib
import pkgutil
import shutil
import subprocess

import pytest

import fastface
from fastface._backend import KernelFile, read_kernel_source

KERNEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels"
CUDA_SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
CUDA_HEADERS = sorted(KERNEL_DIR.glob("*.cuh"))


def test_kernel_folder_holds_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files found in {KERNEL_DIR}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90_without_warnings(source, tmp_path):
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings", "-c", str(source),
         "-o", str(tmp_path / (source.stem + ".o"))],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stdout}\n{result.stderr}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_rasterizer_profiling_variants_compile_appended_to_the_rasterizer(tmp_path):
    # bench/rasterize_variants.cu is not standalone: the profiler appends it to rasterize.cu.
    combined = tmp_path / "rasterize_with_variants.cu"
    combined.write_text(read_kernel_source("rasterize.cu") + "\n"
                        + (KERNEL_DIR.parent / "bench" / "rasterize_variants.cu").read_text())
    test_cuda_source_compiles_for_sm90_without_warnings(combined, tmp_path)


def _declared_kernel_files():
    # Importing every fastface module runs each module's KernelFile(...) declaration.
    for module in pkgutil.walk_packages(fastface.__path__, "fastface."):
        if module.name != "fastface.__main__":
            importlib.import_module(module.name)
    return sorted({k.filename: k for k in KernelFile.declared}.values(), key=lambda k: k.filename)


def test_every_kernel_source_is_declared_by_the_library():
    declared = {k.filename for k in _declared_kernel_files()}
    assert declared == {p.name for p in CUDA_SOURCES}, "a kernels/*.cu file that nothing launches, or the reverse"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("kernel_file", _declared_kernel_files(), ids=lambda k: k.filename)
def test_every_declared_kernel_exists_with_the_file_compile_options(kernel_file, tmp_path):
    # Taking each kernel's address instantiates the template and fails on a name that does not exist,
    # as NVRTC's name_expressions would at run time on the GPU.
    # The source is the text the library hands NVRTC: kernels/*.cuh headers pasted in.
    references = ",\n    ".join(f"(void*)&{name}" for name in kernel_file.kernels)
    wrapper = tmp_path / f"declared_{kernel_file.filename}"
    wrapper.write_text(read_kernel_source(kernel_file.filename)
                       + f"\nvoid* fastface_declared_kernels[] = {{\n    {references}\n}};\n")
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings", *kernel_file.options, "-c", str(wrapper),
         "-o", str(tmp_path / "declared.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, (f"kernels/{kernel_file.filename}: a declared kernel does not compile:\n"
                                    f"{result.stdout}\n{result.stderr}")


def test_kernel_headers_are_pasted_into_the_source_the_library_compiles():
    assert CUDA_HEADERS, "kernels/*.cuh: none found"
    users = {}
    for source in CUDA_SOURCES:
        text = read_kernel_source(source.name)
        assert "#include \"" not in text, f"{source.name}: a local include was left for NVRTC to resolve"
        for header in CUDA_HEADERS:
            if f'#include "{header.name}"' in source.read_text():
                users.setdefault(header.name, []).append(source.name)
                assert text.count(f"// ---- {header.name} ----") == 1
                assert "#pragma once" not in text
    assert set(users) == {h.name for h in CUDA_HEADERS}, "a header that no kernel source includes"
