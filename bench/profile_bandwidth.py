"""Device-time profile of the bandwidth-bound ops: face model evaluation and normals + SH shading.

    python3 bench/profile_bandwidth.py

Prints one row per op and kernel variant: the device time per call, the achieved GB/s (minimal
bytes / device time, the bytes as in bench/bench_model.py and bench/bench_shading.py) and its
fraction of a measured 1 GiB device-to-device copy (read + write bytes), the issue's yardstick.

Two times per row, both medians of CUDA-event timings over several rounds:
  device_us  the GPU's own time per call: before the timed calls the stream is given a backlog of
             large copies, so the Python side queues every timed call before the GPU reaches them
             and the events measure only the kernels (and the gaps between them on the GPU);
  queued_us  events around back-to-back calls without a backlog, as the pytest benchmarks measure:
             when it is much larger than device_us the op is bound by Python and launch overhead,
             not by the GPU.
Self-contained apart from fastface and the two benchmark modules' workloads; < 30 s on an H100/H200.
"""
import os
import statistics
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cupy  # noqa: E402

import fastface  # noqa: E402
import fastface.model.morphable as morphable_module  # noqa: E402

CALLS = 20   # timed calls per round
ROUNDS = 7   # rounds; the median is reported
COPY_BYTES = 1 << 30


def copy_bandwidth():
    """GB/s of a 1 GiB device-to-device copy, read + write bytes, median of 10."""
    src = cupy.ones(COPY_BYTES // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    dst[...] = src
    times = []
    for _ in range(10):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        dst[...] = src
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    seconds = statistics.median(times)
    return 2 * COPY_BYTES / seconds / 1e9, seconds, (src, dst)


class Timer:
    def __init__(self):
        self.copy_gb_s, self.copy_s, (self.src, self.dst) = copy_bandwidth()

    def _round(self, fn, backlog_copies):
        cupy.cuda.Device().synchronize()
        for _ in range(backlog_copies):
            self.dst[...] = self.src
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(CALLS):
            fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / CALLS

    def time(self, fn):
        """(device seconds per call, queued seconds per call, host seconds per call)."""
        fn()
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        host = (time.perf_counter() - t0) / CALLS  # enqueue time (the GPU may still be running)
        cupy.cuda.Device().synchronize()
        queued = statistics.median(self._round(fn, 0) for _ in range(ROUNDS))
        # Enough backlog that the host queues all CALLS calls (1.5x its enqueue time) before the GPU
        # gets to them.
        backlog = 1 + int(1.5 * CALLS * max(host, queued) / self.copy_s)
        device = statistics.median(self._round(fn, backlog) for _ in range(ROUNDS))
        return device, queued, host


ROWS = []


def row(timer, group, name, fn, nbytes):
    with fastface.value_checks(False):
        device, queued, host = timer.time(fn)
    gb_s = nbytes / device / 1e9
    ROWS.append((group, name, nbytes / 1e6, device * 1e6, queued * 1e6, host * 1e6, gb_s, gb_s / timer.copy_gb_s))
    r = ROWS[-1]
    print(f"{r[0]:<22} {r[1]:<34} {r[2]:>8.1f} {r[3]:>9.1f} {r[4]:>9.1f} {r[5]:>8.1f} {r[6]:>8.0f} {r[7]:>6.3f}",
          flush=True)


def model_rows(timer):
    from bench.bench_model import inputs, minimal_bytes
    from fastface.model import FaceModel
    model = FaceModel.default().to("gpu")
    for batch in (1, 8, 64):
        coeffs, grads = inputs(model, batch, cupy)
        kernel = "gemv" if batch <= morphable_module._SMALL_BATCH else "tiled"
        row(timer, "model evaluate", f"B={batch} {kernel}", lambda: model.evaluate(*coeffs),
            minimal_bytes(model, batch, "evaluate"))
        row(timer, "model evaluate_bwd", f"B={batch} {kernel}", lambda: model.evaluate_backward(*grads),
            minimal_bytes(model, batch, "evaluate_backward"))


def shading_rows(timer):
    from bench.bench_shading import GPU_BATCH, NAMES, make_inputs, minimal_bytes, step
    arrays = make_inputs(GPU_BATCH, cupy)
    cupy.cuda.Device().synchronize()
    for name in NAMES:
        row(timer, f"normals+SH B={GPU_BATCH}", name, step(name, arrays), minimal_bytes(name, arrays))


def main():
    t0 = time.perf_counter()
    timer = Timer()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"device: {props['name'].decode()}; d2d copy {timer.copy_gb_s:.0f} GB/s (read + write, 1 GiB, "
          f"{timer.copy_s * 1e6:.0f} us); half of it: {timer.copy_gb_s / 2:.0f} GB/s")
    print(f"{'group':<22} {'variant':<34} {'MB':>8} {'device_us':>9} {'queued_us':>9} {'host_us':>8} "
          f"{'GB/s':>8} {'frac':>6}")
    for part in (model_rows, shading_rows):
        try:
            part(timer)
        except Exception as e:  # keep the other part's rows
            print(f"{part.__name__} failed: {type(e).__name__}: {e}", flush=True)
    print(f"(device_us: GPU time per call behind a copy backlog; queued_us: events around back-to-back calls; "
          f"host_us: Python enqueue time per call; frac = GB/s / copy GB/s; total {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
