"""The morphable model's two GPU paths above batch 8, timed on the default model at the training batch.

`fastface/model/morphable.py` sends batches above 8 either through cuBLAS SGEMM between two small kernels
("cublas") or through the tiled kernels morphable_fwd<8, 8> / morphable_bwd<8, 8> ("tiled"); the
default (`_LARGE_BATCH_PATH`) is the faster one here. Device time per call of back-to-back calls.

    PYTHONPATH=$PWD python bench/profile_morphable.py
"""
import sys

import numpy as np

import fastface
from bench._gpu_timing import device_seconds


def main(batch=64):
    import cupy
    module = sys.modules["fastface.model.morphable"]
    model = fastface.FaceModel.default().to("gpu")
    rng = np.random.default_rng(0)
    coeffs = [cupy.asarray(rng.normal(size=(batch, k)).astype(np.float32))
              for k in (model.n_shape, model.n_expression, model.n_albedo)]
    grads = [cupy.asarray(rng.normal(size=(batch, model.n_vertices, 3)).astype(np.float32)) for _ in range(2)]
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, batch {batch}, "
          f"{model.n_vertices} vertices, K = {model.n_shape + model.n_expression} + {model.n_albedo}")
    results = {}
    with fastface.value_checks(False):
        for path in ("tiled", "cublas"):
            module._LARGE_BATCH_PATH = path
            forward = device_seconds(lambda: model.evaluate(*coeffs), 30)
            backward = device_seconds(lambda: model.evaluate_backward(*grads), 30)
            results[path] = [r.get() for r in model.evaluate(*coeffs)] + [
                r.get() for r in model.evaluate_backward(*grads)]
            print(f"{path}: evaluate {forward * 1e6:.1f} us, evaluate_backward {backward * 1e6:.1f} us "
                  f"(geometry and albedo together)")
    worst = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                for a, b in zip(results["cublas"], results["tiled"]))
    print(f"largest difference between the paths, relative to each output's largest value: {worst:.2e}")


if __name__ == "__main__":
    main()
