"""Minimum-of-repeats timing for A/B comparisons on a shared CPU (bench/ab_*.py); not a benchmark itself.

On a machine that other jobs share, pytest-benchmark's statistics drown in their load; the minimum of
many calls, compared between two checkouts run alternately, is what stays comparable.
"""
import time

import numpy as np

import fastface


def print_minima(steps, repeats):
    """Times each of `steps` (name -> function of no arguments) `repeats` times, value checks off, after
    one untimed call (Numba compiles or loads its cache), and prints its minimum and median."""
    with fastface.value_checks(False):
        for name, fn in steps.items():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            times = np.array(times) * 1e3
            print(f"{name}: min {times.min():.2f} ms  median {np.median(times):.2f} ms  ({repeats} runs)")
