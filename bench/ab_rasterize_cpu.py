"""Minimum-of-repeats timing of the CPU rasterizer: batch 8, 224 x 224, spherical cap n=189 (70,688 triangles).

For A/B comparisons on a shared machine, where pytest-benchmark's statistics drown in the other processes'
load: run it alternately from two checkouts and compare the minima of the quiet rounds, e.g.

    for r in 1 2 3 4 5 6; do
        (cd ../base && PYTHONPATH=$PWD python bench/ab_rasterize_cpu.py 25)
        (cd ../new && PYTHONPATH=$PWD python bench/ab_rasterize_cpu.py 25)
    done
"""
import sys

import numpy as np

from bench._ab_timing import print_minima
from bench.workloads import spherical_cap
from fastface.ops.rasterize import rasterize, rasterize_interpolate, rasterize_interpolate_backward

RES = (224, 224)


def main(repeats):
    pos, tri, colors = spherical_cap(n=189, batch=8)
    grad_out = np.random.default_rng(1).standard_normal((8,) + RES + (3,)).astype(np.float32)

    def fwd_bwd_fused():
        raster, _ = rasterize_interpolate(pos, tri, RES, colors)
        return rasterize_interpolate_backward(pos, tri, colors, raster, grad_out)

    steps = {"rasterize_interpolate_fused": lambda: rasterize_interpolate(pos, tri, RES, colors),
             "rasterize": lambda: rasterize(pos, tri, RES),
             "fwd_bwd_fused": fwd_bwd_fused}
    print_minima(steps, repeats)

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
