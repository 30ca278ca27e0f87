"""Every CUDA source compiles with nvcc for Hopper with all warnings as errors.

Runs wherever nvcc is on the PATH (CI included), so a kernel that no longer compiles is caught
on machines without a GPU; NVRTC (what CuPy uses at run time) accepts a subset of what nvcc does.
"""
import pathlib
import shutil
import subprocess

import pytest

KERNEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels"
CUDA_SOURCES = sorted(KERNEL_DIR.glob("*.cu"))


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
    combined.write_text((KERNEL_DIR / "rasterize.cu").read_text() + "\n"
                        + (KERNEL_DIR.parent / "bench" / "rasterize_variants.cu").read_text())
    test_cuda_source_compiles_for_sm90_without_warnings(combined, tmp_path)
