"""Where the GPU training step's time goes: each stage recorded in a CUDA graph of its own and timed.

The step at the GPU defaults (default model, 224x224, batch 64, both levels) is recorded whole, as
the training loop runs it (fastface/training_step.py), and in growing prefixes: the forward (encoder,
decode, both levels rendered), + the objective (every loss and regularizer), + the backward, + both
Adam updates. The device time of each graph replay (CUDA events around back-to-back replays) and
the differences between them give each stage's cost without Python's launch gaps. Then the whole
step in each encoder precision, and the wall time of a loop step (copy the batch in, replay, read the
report back). Issue #8's target: <= 4 ms per step on the H200.

    PYTHONPATH=$PWD python bench/profile_train_step.py
"""
import time

import numpy as np

import fastface
from bench._gpu_timing import device_seconds
from fastface.cuda_graph import capture
from fastface.train import build, default_settings
from fastface.training_step import TrainingStep


def _batch(autoencoder, n):
    from fastface.data.synthetic import TRAIN_SEEDS, SyntheticFaces
    faces = SyntheticFaces(autoencoder.model, resolution=autoencoder.resolution)
    return faces.batch([TRAIN_SEEDS[i] for i in range(n)])


def stages(precision):
    settings = default_settings("gpu", precision=precision)
    autoencoder, objective, optimizers = build(settings)
    data = _batch(autoencoder, settings.batch)
    images, landmarks = data.images, data.landmarks
    opts = list(optimizers.values())

    def forward():
        return autoencoder.forward(images, final=True)

    def with_objective():
        out = forward()
        return out, objective(out, images, landmarks, final=True)

    def with_backward():
        out, (_, grads) = with_objective()
        autoencoder.backward(out, grads)

    def with_adam():
        with_backward()
        for opt in opts:
            opt.step()

    rows = []
    for name, fn in (("forward (encoder, decode, both levels rendered)", forward),
                     ("+ objective (every loss and regularizer)", with_objective),
                     ("+ backward (render chain, corrective space, encoder)", with_backward),
                     ("+ both Adam updates", with_adam)):
        with fastface.value_checks(False):
            fn()  # warm-up: compiles, fills caches, makes the encoder's workspace
            graph = capture(fn, name)
            autoencoder.encoder.hold_workspaces()
            rows.append((name, device_seconds(graph.launch, 30)))
    return rows


def whole_step(precision):
    import cupy
    settings = default_settings("gpu", precision=precision)
    autoencoder, objective, optimizers = build(settings)
    data = _batch(autoencoder, settings.batch)
    step = TrainingStep(autoencoder, objective, optimizers, final=True)
    step(data.images, data.landmarks)
    step(data.images, data.landmarks)
    assert step.captured
    device = device_seconds(step._graph.launch, 30)
    cupy.cuda.Device().synchronize()
    walls = []
    for _ in range(30):
        t0 = time.perf_counter()
        report = step(data.images, data.landmarks)  # copy in, replay, one read-back
        walls.append(time.perf_counter() - t0)
    assert not report.skipped
    eager = TrainingStep(autoencoder, objective, optimizers, final=True, graph=False)
    eager(data.images, data.landmarks)
    eager_walls = []
    for _ in range(10):
        t0 = time.perf_counter()
        eager(data.images, data.landmarks)
        eager_walls.append(time.perf_counter() - t0)
    return device, float(np.median(walls)), float(np.median(eager_walls))


def main():
    import cupy
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    for name, seconds in stages("tf32"):
        print(f"tf32 graph, {name}: {seconds * 1e3:.3f} ms device")
    for precision in ("tf32", "float32", "float16"):
        device, wall, eager = whole_step(precision)
        print(f"whole step {precision}: graph {device * 1e3:.3f} ms device, loop step {wall * 1e3:.3f} ms wall "
              f"(copy in + replay + report), eager {eager * 1e3:.3f} ms wall; target <= 4 ms")


if __name__ == "__main__":
    main()
