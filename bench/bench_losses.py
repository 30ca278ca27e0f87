"""The training losses (fastface/ops/losses.py), forward and backward: the photometric loss is the one
that reads whole images; landmarks and the prior are B x 68 and B x 80 and cost their launch.

Workloads: photometric on (B, H, W, 3) float32 rendered and target images with a bool mask (about
half the pixels), at the CPU training default (64 x 64, batch 8) and the GPU one (224 x 224, batch
64); landmarks (B, 68, 2) with (68,) weights; prior (B, 80). Value checks off, as in the training loop.

Figures: images_per_s from the median wall time of one call (synchronised on the GPU), and for the
photometric rows achieved GB/s of the minimal bytes (rendered, target and mask read once; the
backward also writes grad_rendered), on the GPU also from CUDA events and against the copy.

    python -m pytest bench/bench_losses.py --benchmark-only
"""
import numpy as np
import pytest

import fastface
from bench._gpu_timing import bench_gpu, median_seconds, needs_gpu, record_bandwidth
from fastface.ops.losses import (landmark_loss, landmark_loss_backward, photometric_loss, photometric_loss_backward,
                                 prior_loss, prior_loss_backward)

CPU_WORK = (8, 64)     # batch, resolution
GPU_WORK = (64, 224)


def make_inputs(batch, resolution, xp=np):
    rng = np.random.default_rng(0)
    shape = (batch, resolution, resolution)
    arrays = dict(
        rendered=rng.uniform(size=shape + (3,)).astype(np.float32),
        target=rng.uniform(size=shape + (3,)).astype(np.float32),
        mask=rng.uniform(size=shape) < 0.5,
        grad_out=np.ones(batch, np.float32),
        points=rng.uniform(0, resolution, size=(batch, 68, 2)).astype(np.float32),
        landmarks=rng.uniform(0, resolution, size=(batch, 68, 2)).astype(np.float32),
        landmark_weights=np.ones(68, np.float32),
        coeffs=rng.normal(size=(batch, 80)).astype(np.float32),
        prior_weights=np.ones(80, np.float32),
    )
    return {k: xp.asarray(v) for k, v in arrays.items()}


def calls(a):
    return {
        "photometric_fwd": lambda: photometric_loss(a["rendered"], a["target"], a["mask"]),
        "photometric_bwd": lambda: photometric_loss_backward(a["rendered"], a["target"], a["mask"], a["grad_out"]),
        "landmark_fwd_bwd": lambda: (landmark_loss(a["points"], a["landmarks"], a["landmark_weights"]),
                                     landmark_loss_backward(a["points"], a["landmarks"], a["landmark_weights"],
                                                            a["grad_out"])),
        "prior_fwd_bwd": lambda: (prior_loss(a["coeffs"], a["prior_weights"]),
                                  prior_loss_backward(a["coeffs"], a["prior_weights"], a["grad_out"])),
    }


def minimal_bytes(name, a):
    if not name.startswith("photometric"):
        return None
    image = a["rendered"].nbytes
    return 2 * image + a["mask"].nbytes + (image if name.endswith("bwd") else 0)


NAMES = ["photometric_fwd", "photometric_bwd", "landmark_fwd_bwd", "prior_fwd_bwd"]


@pytest.mark.parametrize("name", NAMES)
def test_cpu_losses(benchmark, name):
    batch, resolution = CPU_WORK
    a = make_inputs(batch, resolution)
    fn = calls(a)[name]
    benchmark.group = f"losses {resolution}x{resolution} B={batch} (CPU)"
    with fastface.value_checks(False):
        fn()  # compile / load the Numba cache outside the timing
        benchmark(fn)
    seconds = median_seconds(benchmark)
    if seconds is not None:
        benchmark.extra_info["images_per_s"] = round(batch / seconds, 1)
        nbytes = minimal_bytes(name, a)
        if nbytes:
            benchmark.extra_info["gb_s"] = round(nbytes / seconds / 1e9, 2)


@needs_gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_losses(benchmark, name):
    import cupy
    batch, resolution = GPU_WORK
    a = make_inputs(batch, resolution, cupy)
    device_s = bench_gpu(benchmark, calls(a)[name], f"losses {resolution}x{resolution} B={batch} (GPU)")
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    benchmark.extra_info["images_per_s"] = round(batch / seconds, 1)
    nbytes = minimal_bytes(name, a)
    if nbytes:
        record_bandwidth(benchmark, nbytes, device_s)
    else:
        benchmark.extra_info["device_us"] = round(device_s * 1e6, 1)
