"""Times one CPU `Adam.step` on the training encoder, `Encoder(257 + 64, resolution=64)` (4.87 M float32
parameters, clipping and weight decay on), and optionally the same step with another version of
fastface/nn/adam.py, for before/after figures (bench/RESULTS.md):

    git show c83560e:fastface/nn/adam.py | sed 's/cache=True/cache=False/' > /tmp/old_adam.py
    PYTHONPATH=$PWD python bench/profile_adam_cpu.py --old /tmp/old_adam.py

(Numba cannot cache functions of a module loaded from a path, hence the sed.) Prints the minimum and
median of `--steps` steps for each version, run one after the other in this process.
"""
import argparse
import importlib.util
import time

import numpy as np

from fastface.nn import Encoder
from fastface.nn import adam as current


def time_steps(module, steps):
    enc = Encoder(257 + 64, resolution=64)
    enc.flat_grads[...] = 1e-3 * np.random.default_rng(0).standard_normal(enc.flat_grads.size).astype(np.float32)
    opt = module.Adam(enc, lr=1e-3, weight_decay=1e-4, clip_norm=1.0)
    opt.step()  # compile or load the Numba cache
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - start)
    return enc.flat_params.size, min(seconds), float(np.median(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="path of another fastface/nn/adam.py to time as well")
    parser.add_argument("--steps", type=int, default=45)
    args = parser.parse_args()
    versions = {}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_adam", args.old)
        versions["old"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions["old"])
    versions["this tree"] = current
    for name, module in versions.items():
        n, best, median = time_steps(module, args.steps)
        print(f"{name}: {n:,} parameters, step min {best * 1e3:.2f} ms, median {median * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
