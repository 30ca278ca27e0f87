"""Where the GPU training step's time goes: each stage recorded in a CUDA graph of its own and timed.

The step at the GPU defaults (default model, 224x224, batch 64, both levels) is recorded whole, as
the training loop runs it (fastface/training_step.py), and in growing prefixes: the forward (encoder,
decode, both levels rendered), + the objective (every loss and regularizer), + the backward, + both
Adam updates. First each loss and regularizer on its own (forward and backward, device time of
back-to-back calls). The device time of each graph replay (CUDA events around back-to-back replays) and
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


def _host_seconds(fn, repeats=5):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def objective_terms(device="gpu", level=None):
    """{term: (forward seconds, backward seconds)} of each loss and regularizer at the device's defaults, on
    one forward's output, called as MultiLevelObjective calls them (the final level's terms; the base
    level's photometric and landmark terms cost the same again)."""
    from fastface.model.corrective import (magnitude_loss, magnitude_loss_backward, reflectance_constancy_loss,
                                           reflectance_constancy_loss_backward, smoothness_loss,
                                           smoothness_loss_backward, symmetry_loss, symmetry_loss_backward)
    from fastface.objective import landmark_point_weights
    from fastface.ops.losses import (landmark_loss, landmark_loss_backward, photometric_loss,
                                     photometric_loss_backward, prior_loss, prior_loss_backward)
    settings = default_settings(device, **({"level": level} if level else {}))
    autoencoder, objective, _ = build(settings)
    data = _batch(autoencoder, settings.batch)
    images, landmarks = data.images, data.landmarks
    seconds = device_seconds if device == "gpu" else _host_seconds
    with fastface.value_checks(False):
        out = autoencoder.forward(images, final=True)
        xp = np if device == "cpu" else __import__("cupy")
        B = images.shape[0]
        g = xp.full(B, 1.0 / B, dtype=np.float32)
        r, mesh = out.final, objective.mesh
        geo, ref = out.geometry_offsets, out.reflectance_offsets
        weights = xp.asarray(landmark_point_weights())
        terms = {
            "photometric": (lambda: photometric_loss(r.image, images, r.mask),
                            lambda: photometric_loss_backward(r.image, images, r.mask, g)),
            "landmarks": (lambda: landmark_loss(r.landmarks, landmarks, weights),
                          lambda: landmark_loss_backward(r.landmarks, landmarks, weights, g)),
            "prior (shape)": (lambda: prior_loss(out.params.shape), lambda: prior_loss_backward(out.params.shape, None, g)),
            "geometry smoothness": (lambda: smoothness_loss(geo, mesh), lambda: smoothness_loss_backward(geo, mesh, g)),
            "geometry magnitude": (lambda: magnitude_loss(geo), lambda: magnitude_loss_backward(geo, g)),
            "geometry symmetry": (lambda: symmetry_loss(geo, mesh, True),
                                  lambda: symmetry_loss_backward(geo, mesh, g, True)),
            "reflectance constancy": (lambda: reflectance_constancy_loss(r.albedo, out.base.albedo, mesh),
                                      lambda: reflectance_constancy_loss_backward(r.albedo, out.base.albedo, mesh, g)),
            "reflectance symmetry": (lambda: symmetry_loss(ref, mesh, False),
                                     lambda: symmetry_loss_backward(ref, mesh, g, False)),
        }
        return {name: (seconds(fwd), seconds(bwd)) for name, (fwd, bwd) in terms.items()}


def main():
    import cupy
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    for name, (fwd, bwd) in objective_terms().items():
        print(f"objective term {name}: forward {fwd * 1e6:.1f} us, backward {bwd * 1e6:.1f} us device")
    for name, seconds in stages("tf32"):
        print(f"tf32 graph, {name}: {seconds * 1e3:.3f} ms device")
    for precision in ("tf32", "float32", "float16"):
        device, wall, eager = whole_step(precision)
        print(f"whole step {precision}: graph {device * 1e3:.3f} ms device, loop step {wall * 1e3:.3f} ms wall "
              f"(copy in + replay + report), eager {eager * 1e3:.3f} ms wall; target <= 4 ms")


if __name__ == "__main__":
    main()
