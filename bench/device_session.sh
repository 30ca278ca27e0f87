#!/usr/bin/env bash
# A lent-GPU session in two calls of the device tool (each call may run 600 s; run 4 took 7 min for
# what is now the first part alone plus the benchmarks):
#   OUT=$OUT bash bench/device_session.sh tests   # every GPU test (one process per file), then
#                                                 # compute-sanitizer memcheck on the tests of the kernels
#                                                 # changed last (antialias, the rasterizer, losses, correctives)
#   OUT=$OUT bash bench/device_session.sh bench   # the GPU benchmarks of training, antialias and the
#                                                 # rasterizer, then the profiles (face model, training loop
#                                                 # with its data, rasterizer, antialias, training step), then
#                                                 # Nsight Compute's kernel times
# With no argument it runs both (on a machine without the 600 s limit). Logs under $OUT, at most 8
# files a call (the device tool brings back no more): tests: env.txt, tests.log, sanitizer.log; bench:
# env.txt, bench.json, bench.log, bench_summary.txt, profiles.log, ncu.csv, ncu_summary.txt.
set -uo pipefail
OUT=${OUT:-/tmp/fastface_device}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NUMBA_CACHE_DIR=/tmp/fastface_numba_cache
part=${1:-all}

if [ "$part" = tests ] || [ "$part" = all ]; then
  TEST_TIMEOUT=${TEST_TIMEOUT:-90} bash bench/run_device.sh tests
  : > "$OUT/sanitizer.log"
  for f in ${SANITIZE_FILES:-tests/ops/test_antialias.py tests/ops/test_rasterize.py tests/test_render.py tests/ops/test_losses.py tests/model/test_corrective.py tests/test_training_step.py}; do
    echo "== $f" >> "$OUT/sanitizer.log"
    timeout "${SANITIZE_TIMEOUT:-75}" compute-sanitizer --tool memcheck --error-exitcode 99 \
        python3 -m pytest "$f" -m gpu -q -x -p no:cacheprovider >> "$OUT/sanitizer.log" 2>&1
    rc=$?; echo "$f: memcheck rc=$rc" | tee -a "$OUT/sanitizer.log"
  done
  grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/sanitizer.log" | sort | uniq -c | head -20
fi

if [ "$part" = bench ] || [ "$part" = all ]; then
  BENCH_FILES=${BENCH_FILES:-"bench/bench_train.py bench/bench_antialias.py bench/bench_rasterize.py"} \
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-240} bash bench/run_device.sh bench
  # Last (a timeout keeps the logs above): per-kernel rasterizer times (issue 10), where antialias's and
  # the training step's time goes.
  : > "$OUT/profiles.log"
  for p in profile_morphable profile_train_loop profile_rasterize profile_antialias profile_train_step; do
    timeout "${PROFILE_TIMEOUT:-100}" python3 "bench/$p.py" >> "$OUT/profiles.log" 2>&1
    echo "$p rc=$?" | tee -a "$OUT/profiles.log"
  done
  tail -16 "$OUT/profiles.log"
  # Every kernel of one training step timed alone (Nsight Compute; works on the Firecracker machines).
  timeout "${NCU_TIMEOUT:-120}" ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
      --csv --page raw --log-file "$OUT/ncu.csv" python3 bench/ncu_kernels.py > /dev/null 2>&1
  python3 bench/ncu_kernels.py --summarize "$OUT/ncu.csv" > "$OUT/ncu_summary.txt" 2>&1 && head -40 "$OUT/ncu_summary.txt"
fi
