"""The morphable model's two GPU paths above batch 8, timed on the default model at the training batch.

`fastface/model/morphable.py` sends batches above 8 either through cuBLAS between two small kernels
("cublas", float32 SGEMM or TF32 as the model's precision says) or through the tiled kernels
morphable_fwd<8, 8> / morphable_bwd<8, 8> ("tiled", float32); its default (`_LARGE_BATCH_PATH` None,
`_use_cublas`) takes what this measured faster. Device time per call of back-to-back calls.

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
        for path, precision in (("tiled", "float32"), ("cublas", "float32"), ("cublas", "tf32")):
            module._LARGE_BATCH_PATH = path
            timed = model.to("gpu", precision=precision)
            forward = device_seconds(lambda: timed.evaluate(*coeffs), 30)
            backward = device_seconds(lambda: timed.evaluate_backward(*grads), 30)
            results[path, precision] = [r.get() for r in timed.evaluate(*coeffs)] + [
                r.get() for r in timed.evaluate_backward(*grads)]
            print(f"{path} {precision}: evaluate {forward * 1e6:.1f} us, evaluate_backward {backward * 1e6:.1f} us "
                  f"(geometry and albedo together)")
        module._LARGE_BATCH_PATH = None
    for key in (("cublas", "float32"), ("cublas", "tf32")):
        worst = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                    for a, b in zip(results[key], results["tiled", "float32"]))
        print(f"{' '.join(key)} against tiled float32: largest difference relative to each output's largest value "
              f"{worst:.2e}")


if __name__ == "__main__":
    main()
