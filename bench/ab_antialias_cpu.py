"""Minimum-of-repeats timing of antialias on the CPU (batch 8, 224x224, the 70,688-triangle cap of
bench/bench_antialias.py, each checkout's own definition of the timed work), for A/B comparisons on a
shared machine: run it alternately from two checkouts and compare the minima.

    for r in 1 2 3; do
        (cd ../base && PYTHONPATH=$PWD python bench/ab_antialias_cpu.py 25)
        (cd ../new && PYTHONPATH=$PWD python bench/ab_antialias_cpu.py 25)
    done
"""
import sys

import numpy as np

from bench._ab_timing import print_minima
from bench.bench_antialias import CPU_BATCH, prepare, steps


def main(repeats):
    work = steps(*prepare(np, CPU_BATCH))
    print_minima({name: work[name] for name in ("antialias_fwd", "antialias_fwd_bwd")}, repeats)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 25)
