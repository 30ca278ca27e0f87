"""Timing shared by the benchmark files (bench/bench_*.py); not a benchmark itself.

A GPU row is timed twice: the wall time of one call synchronised inside the timed function (what
pytest-benchmark measures, Python overhead included), and the device time per call from CUDA
events around back-to-back calls (the kernels' throughput whenever the GPU, not Python, is the
bottleneck). Bandwidth-bound rows are set against the device-to-device copy bandwidth measured
here (read + write bytes of a cupy copy), the issues' yardstick.
"""
import functools

import pytest

import fastface
from fastface._backend import gpu_available

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA GPU")


def median_seconds(benchmark):
    """The row's median wall time, or None under --benchmark-disable (the body ran once, untimed)."""
    return None if benchmark.stats is None else benchmark.stats.stats.median


def record_throughput(benchmark, batch, **extra):
    """Adds the row's median `ms` and `images_per_s` (batch images per call) and `extra` to its extra_info."""
    benchmark.extra_info.update(extra)
    seconds = median_seconds(benchmark)
    if seconds is not None:  # None under --benchmark-disable: the body ran once, untimed
        benchmark.extra_info["ms"] = round(seconds * 1e3, 4)
        benchmark.extra_info["images_per_s"] = round(batch / seconds, 1)


def device_seconds(fn, repeats=50):
    """Seconds per call from CUDA events around `repeats` back-to-back calls."""
    import cupy
    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeats


@functools.lru_cache(maxsize=None)
def gpu_copy_bandwidth(nbytes=1 << 30, repeats=20):
    """Device-to-device copy bandwidth in GB/s, counting the bytes read plus the bytes written."""
    import cupy
    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)

    def copy():
        dst[...] = src

    return 2 * nbytes / device_seconds(copy, repeats) / 1e9


def bench_cpu(benchmark, fn, group):
    """Benchmarks `fn` on the CPU with value checks off, after one untimed call (Numba compiles or loads
    its cache)."""
    benchmark.group = group
    with fastface.value_checks(False):
        fn()
        benchmark(fn)


def bench_gpu(benchmark, fn, group, repeats=50, value_checks=False):
    """Benchmarks `fn` synchronised (value checks off unless asked, one untimed call first to
    compile), then returns its device seconds per call from `repeats` back-to-back calls."""
    import cupy

    def timed():
        fn()
        cupy.cuda.Device().synchronize()

    benchmark.group = group
    with fastface.value_checks(value_checks):
        timed()
        benchmark(timed)
        return device_seconds(fn, repeats)


def record_bandwidth(benchmark, nbytes, device_s):
    """extra_info of a bandwidth-bound GPU row moving `nbytes` (minimal bytes) per call."""
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    copy = gpu_copy_bandwidth()
    benchmark.extra_info["gb_s_wall"] = round(nbytes / seconds / 1e9, 1)
    benchmark.extra_info["device_us"] = round(device_s * 1e6, 1)
    benchmark.extra_info["device_gb_s"] = round(nbytes / device_s / 1e9, 1)
    benchmark.extra_info["copy_gb_s"] = round(copy, 1)
    benchmark.extra_info["fraction_of_copy"] = round(nbytes / device_s / 1e9 / copy, 3)


def bench_copy_bandwidth(benchmark):
    """The yardstick row: a synchronised 1 GiB device-to-device copy."""
    import cupy
    a = cupy.ones(1 << 28, dtype=cupy.float32)
    b = cupy.empty_like(a)

    def copy():
        b[...] = a
        cupy.cuda.Device().synchronize()

    benchmark.group = "device copy (1 GiB d2d)"
    benchmark(copy)
    seconds = median_seconds(benchmark)
    if seconds is not None:
        benchmark.extra_info["copy_gb_s_events"] = round(gpu_copy_bandwidth(), 1)
        benchmark.extra_info["copy_gb_s_wall"] = round(2 * a.nbytes / seconds / 1e9, 1)
