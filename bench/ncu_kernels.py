"""Every kernel of one GPU training step (and of antialias and the rasterizer) with its own device time.

Run under Nsight Compute, which times each kernel alone (no launch gaps, no overlap):

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \
        --log-file ncu.csv python3 bench/ncu_kernels.py
    python3 bench/ncu_kernels.py --summarize ncu.csv

Only the region between cudaProfilerStart and cudaProfilerStop is profiled: one eager training step at
the GPU defaults (default model, 224x224, batch 64, both levels), then antialias forward + backward and
the rasterizer's fused forward + backward on bench_antialias's workload. Marker kernels named
`stage_<name>` split the list into stages, so --summarize can total each stage by kernel name.
"""
import sys

import numpy as np

_MARKER_SOURCE = 'extern "C" __global__ void stage_%s(int *flag) { if (threadIdx.x == 0 && flag) *flag = 0; }'


def _marker(name):
    import cupy
    kernel = cupy.RawKernel(_MARKER_SOURCE % name, f"stage_{name}")
    return lambda: kernel((1,), (32,), (np.intp(0),))


def run():
    import cupy

    import fastface
    from bench.bench_antialias import GPU_BATCH, RES, prepare
    from bench.profile_train_step import _batch
    from fastface.ops.antialias import antialias, antialias_backward, silhouette_pixels
    from fastface.ops.rasterize import rasterize_interpolate, rasterize_interpolate_backward
    from fastface.train import build, default_settings

    settings = default_settings("gpu")
    autoencoder, objective, optimizers = build(settings)
    data = _batch(autoencoder, settings.batch)
    images, landmarks = data.images, data.landmarks
    pos, tri, colors, raster, image, topology, grad_out = prepare(cupy, GPU_BATCH)
    names = ("forward", "objective", "backward", "adam", "antialias_silhouette_pixels", "antialias_forward",
             "antialias_backward", "rasterizer_forward", "rasterizer_backward", "end")
    markers = {name: _marker(name) for name in names}

    def pass_once(profiled):
        with fastface.value_checks(False):
            markers["forward"]()
            out = autoencoder.forward(images, final=True)
            markers["objective"]()
            _, grads = objective(out, images, landmarks, final=True)
            markers["backward"]()
            autoencoder.backward(out, grads)
            markers["adam"]()
            for opt in optimizers.values():
                opt.step()
            markers["antialias_silhouette_pixels"]()
            sil = silhouette_pixels(raster, pos, tri, topology)
            markers["antialias_forward"]()
            antialias(image, raster, pos, tri, silhouettes=sil)
            markers["antialias_backward"]()
            antialias_backward(image, raster, pos, tri, grad_out, silhouettes=sil)
            markers["rasterizer_forward"]()
            r, _ = rasterize_interpolate(pos, tri, RES, colors)
            markers["rasterizer_backward"]()
            rasterize_interpolate_backward(pos, tri, colors, r, grad_out)
            markers["end"]()
        cupy.cuda.Device().synchronize()

    pass_once(False)  # compiles every kernel, makes the workspaces
    pass_once(False)
    cupy.cuda.runtime.profilerStart()
    pass_once(True)
    cupy.cuda.runtime.profilerStop()


def summarize(path):
    import csv
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    reader = csv.DictReader(lines)
    for row in reader:
        value = row.get("gpu__time_duration.sum", "")
        try:
            rows.append((row["Kernel Name"], float(value.replace(",", ""))))
        except ValueError:
            continue  # the units row
    stage, totals, order = "before", {}, []
    for name, ns in rows:
        if name.startswith("stage_"):
            stage = name[len("stage_"):]
            order.append(stage)
            continue
        short = name.split("(")[0].split("<")[0][:60]
        totals.setdefault(stage, {}).setdefault(short, [0.0, 0])
        totals[stage][short][0] += ns
        totals[stage][short][1] += 1
    for stage in order:
        kernels = totals.get(stage, {})
        total = sum(v[0] for v in kernels.values())
        if not kernels:
            continue
        print(f"== {stage}: {total / 1e3:.1f} us in {sum(v[1] for v in kernels.values())} kernels")
        for short, (ns, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
            print(f"   {ns / 1e3:9.1f} us  x{count:<3d} {short}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        run()
