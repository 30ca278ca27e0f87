"""Synthetic training faces (fastface.data.SyntheticFaces): one batch generated and rendered.

Workloads: the CPU training configuration (small model, 64x64, batch 8) and a larger CPU one; on
the GPU the full configuration (default model, 224x224, batch 64). Each batch draws its faces'
random numbers on the host, moves them once, evaluates the model and the detail, renders at 2x
and area-averages, and composes the background.

    python -m pytest bench/bench_synthetic.py

Measured on the shared 2-core development machine (AMD EPYC, load average 5-8 from other jobs),
2026-12-04 14:15 UTC, one thread (OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1), CPU time per batch
(time.process_time; wall time was 2-3x that under the load, and with two threads worse still):
small model, 64x64, B=8: 13 ms (supersample=1: 11 ms; B=1: 3.1 ms; B=64: 84 ms); default model,
224x224, B=8: 110 ms. Host time to draw a face's random numbers and parameters: ~40 us.
Building the detail dictionaries once per model: ~1 s (small), ~7 s (default) of CPU time. Not run on
a GPU.
"""
import pytest

from bench._gpu_timing import needs_gpu, record_throughput
from fastface import FaceModel
from fastface.data import TRAIN_SEEDS, SyntheticFaces



@pytest.mark.parametrize("level, size, batch", [("small", 64, 8), ("default", 224, 8)])
def test_cpu_synthetic_batch(benchmark, level, size, batch):
    faces = SyntheticFaces(FaceModel.default(level), resolution=(size, size))
    benchmark.group = f"synthetic faces, {level} model, B={batch} {size}x{size} (CPU)"
    faces.batch(TRAIN_SEEDS[:batch])  # compile and build outside the timing
    starts = iter(range(0, 10 ** 6, batch))

    def run():
        start = next(starts)
        return faces.batch(range(start, start + batch))

    benchmark(run)
    record_throughput(benchmark, batch)


@needs_gpu
@pytest.mark.parametrize("batch", [64])
def test_gpu_synthetic_batch(benchmark, batch):
    import cupy
    faces = SyntheticFaces(FaceModel.default().to("gpu"), resolution=(224, 224))
    benchmark.group = f"synthetic faces, default model, B={batch} 224x224 (GPU)"
    starts = iter(range(0, 10 ** 6, batch))

    def run():
        start = next(starts)
        out = faces.batch(range(start, start + batch))
        cupy.cuda.get_current_stream().synchronize()
        return out

    run()
    benchmark(run)
    record_throughput(benchmark, batch)
