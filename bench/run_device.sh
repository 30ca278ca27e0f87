#!/usr/bin/env bash
# The one script for a lent GPU: the GPU tests, the kernel profiles, then the GPU benchmarks, logs under $OUT.
#   bash bench/run_device.sh [tests|profile|bench|all] [extra pytest args...]
# Run from the repository root; nothing is installed (the checkout is on PYTHONPATH).
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/fastface_device}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NUMBA_CACHE_DIR=/tmp/fastface_numba_cache
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, numpy, numba, cupy; print(sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"
} 2>&1 | tee "$OUT/env.txt"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # One process per test file: a kernel fault leaves a sticky CUDA error that would fail
  # every later test in the same process and hide which ones really fail.
  : > "$OUT/tests.log"
  for f in $(grep -l -E "cupy|gpu" tests/*.py tests/*/*.py | grep "/test_"); do
    echo "== $f" >> "$OUT/tests.log"
    timeout "${TEST_TIMEOUT:-120}" python3 -m pytest "$f" -m gpu -q -p no:cacheprovider --tb=short "$@" \
        >> "$OUT/tests.log" 2>&1 || { [ $? -eq 5 ] || status=1; }
    printf '%s: %s\n' "$f" "$(tail -1 "$OUT/tests.log")"
  done
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-300 | head -40
fi
if [ "$what" = profile ] || [ "$what" = all ]; then
  # Per-kernel times and the variants of bench/rasterize_variants.cu; bandwidth-bound ops against a copy.
  for script in profile_rasterize profile_bandwidth; do
    timeout "${PROFILE_TIMEOUT:-120}" python3 "bench/$script.py" > "$OUT/$script.log" 2>&1 || status=1
    tail -40 "$OUT/$script.log"
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 -m pytest ${BENCH_FILES:-bench} -k gpu -q -p no:cacheprovider --tb=short \
      --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,mean,stddev,rounds \
      --benchmark-sort=fullname --benchmark-max-time=0.3 --benchmark-warmup=on "$@" > "$OUT/bench.log" 2>&1 || status=1
  python3 bench/summarize.py "$OUT/bench.json" | tee "$OUT/bench_summary.txt"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/bench.log" | tail -20
fi
exit $status
