"""Where antialias's GPU time goes: the per-pixel silhouette pass, the forward and the backward pixel passes.

Issue 10 asks for antialias forward + backward at batch 64 (70,688-triangle spherical cap, 224x224)
to cost at most a third of the rasterizer's forward + backward. Each stage is timed on its own as
device time per call of back-to-back calls (CUDA events), next to the rasterizer's fused forward +
backward on the same arrays, so that a run shows which stage to work on.

    PYTHONPATH=$PWD python bench/profile_antialias.py
"""
import cupy

import fastface
from bench._gpu_timing import device_seconds
from bench.bench_antialias import GPU_BATCH, RES, prepare
from fastface.ops.antialias import antialias, antialias_backward, silhouette_pixels
from fastface.ops.rasterize import rasterize_interpolate, rasterize_interpolate_backward


def main():
    pos, tri, colors, raster, image, topology, grad_out = prepare(cupy, GPU_BATCH)
    with fastface.value_checks(False):
        sil = silhouette_pixels(raster, pos, tri, topology)
        rows = {
            "silhouette_pixels (per-pixel silhouette masks)": lambda: silhouette_pixels(raster, pos, tri, topology),
            "antialias forward pixel pass (silhouettes given)": lambda: antialias(image, raster, pos, tri,
                                                                                  silhouettes=sil),
            "antialias backward pixel pass (silhouettes given)": lambda: antialias_backward(
                image, raster, pos, tri, grad_out, silhouettes=sil),
        }
        times = {name: device_seconds(fn, 30) for name, fn in rows.items()}

        def rasterizer():
            r, _ = rasterize_interpolate(pos, tri, RES, colors)
            return rasterize_interpolate_backward(pos, tri, colors, r, grad_out)

        reference = device_seconds(rasterizer, 30)
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, batch {GPU_BATCH}, {RES}")
    for name, seconds in times.items():
        print(f"{name}: {seconds * 1e6:.1f} us")
    total = sum(times.values())
    print(f"antialias forward + backward (silhouettes once): {total * 1e6:.1f} us; rasterizer forward + backward "
          f"fused: {reference * 1e6:.1f} us; ratio {total / reference:.2f} (issue 10: <= 0.33)")


if __name__ == "__main__":
    main()
