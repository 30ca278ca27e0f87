"""What `python -m fastface train --device gpu` delivers: the step, the synthetic batch it needs, the loop.

bench/bench_train.py times the training step on one batch made beforehand. A run also renders a new
batch of synthetic faces every step (fastface/data/synthetic.py, on the same stream, before the step)
and writes its log; this script times, at the GPU defaults (default model, 224x224, batch 64):
- the synthetic batch alone (device time of back-to-back batches),
- the step alone (its CUDA graph replayed on one batch),
- data + step as the loop does them (wall per iteration: the batch, the step launched, the next batch's
  draws on the host while the GPU works, the report read back),
- `fastface.train.train` itself for a short run: the median images/s of its log.csv over the steps
  after the graphs are recorded (progress bar off).

    PYTHONPATH=$PWD python bench/profile_train_loop.py
"""
import csv
import tempfile
import time

import numpy as np

import fastface
from bench._gpu_timing import device_seconds
from fastface.train import _Data, build, default_settings, train
from fastface.training_step import TrainingStep


def _host_seconds(fn, repeats):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(device="gpu", iterations=40, run_steps=160):
    """device "cpu" runs the same measurements at the CPU defaults (a check of this script without a GPU)."""
    settings = default_settings(device)
    autoencoder, objective, optimizers = build(settings)
    data = _Data(settings, autoencoder.model, autoencoder.focal, autoencoder.layout.translation)
    step = TrainingStep(autoencoder, objective, optimizers, final=True)
    if device == "gpu":
        import cupy
        name, seconds = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), device_seconds
    else:
        name, seconds = "CPU", _host_seconds
    print(f"device: {name}, batch {settings.batch}, {settings.resolution}px")
    with fastface.value_checks(False):
        images, landmarks = data(0)
        step(images, landmarks)
        step(images, landmarks)  # recorded
        counter = iter(range(1, 10 ** 6))
        data_s = seconds(lambda: data(next(counter)), iterations)
        step_s = seconds(lambda: step.launch(images, landmarks), iterations)
        walls = []
        for i in range(iterations):
            t0 = time.perf_counter()
            values = step.launch(*data(10 ** 6 + i))
            data.prefetch(10 ** 6 + i + 1)  # as train() does: the next draws while the GPU runs the step
            step.read(values)  # the report back: the loop's synchronisation
            walls.append(time.perf_counter() - t0)
    loop_s = float(np.median(walls))
    print(f"synthetic batch: {data_s * 1e3:.3f} ms; step: {step_s * 1e3:.3f} ms (device time on the GPU); "
          f"data + step as the loop runs them: {loop_s * 1e3:.3f} ms wall, {settings.batch / loop_s:,.0f} images/s")
    with tempfile.TemporaryDirectory() as out:
        run = default_settings(device, steps=run_steps, checkpoint_every=10 ** 6, preview_every=10 ** 6)
        t0 = time.perf_counter()
        train(run, out, progress=False)
        total = time.perf_counter() - t0
        with open(f"{out}/log.csv") as f:
            rates = [float(r["images_per_s"]) for r in csv.DictReader(f)]
    later = rates[int(run.base_fraction * run_steps) + 2:]  # the joint stage, its graph recorded
    print(f"train(): {run_steps} steps in {total:.1f} s (building, compiling and the final checkpoint included); "
          f"log.csv median {np.median(later):,.0f} images/s over steps {len(rates) - len(later)}..{len(rates) - 1}")


if __name__ == "__main__":
    import sys
    main(*sys.argv[1:2])
