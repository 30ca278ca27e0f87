#!/usr/bin/env bash
# One lent-GPU session in one call: every GPU test (one process per file), compute-sanitizer memcheck
# on the GPU tests of the newest kernels, then the GPU benchmarks of training, antialias and the
# rasterizer, then the training step stage by stage. Logs under $OUT (at most 8 files come back).
#   OUT=/tmp/x bash bench/device_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/fastface_device}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NUMBA_CACHE_DIR=/tmp/fastface_numba_cache
TEST_TIMEOUT=${TEST_TIMEOUT:-90} bash bench/run_device.sh tests
: > "$OUT/sanitizer.log"
for f in ${SANITIZE_FILES:-tests/ops/test_losses.py tests/model/test_corrective.py tests/ops/test_antialias.py tests/ops/test_rasterize.py tests/test_train.py tests/test_training_step.py}; do
  echo "== $f" >> "$OUT/sanitizer.log"
  timeout "${SANITIZE_TIMEOUT:-75}" compute-sanitizer --tool memcheck --error-exitcode 99 \
      python3 -m pytest "$f" -m gpu -q -x -p no:cacheprovider >> "$OUT/sanitizer.log" 2>&1
  rc=$?; echo "$f: memcheck rc=$rc" | tee -a "$OUT/sanitizer.log"
done
grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/sanitizer.log" | sort | uniq -c | head -20
BENCH_FILES=${BENCH_FILES:-"bench/bench_train.py bench/bench_antialias.py bench/bench_rasterize.py"} \
    BENCH_TIMEOUT=${BENCH_TIMEOUT:-170} bash bench/run_device.sh bench
# Last (a timeout keeps the logs above): where antialias's and the training step's time goes.
for p in profile_antialias profile_train_step; do
  timeout "${PROFILE_TIMEOUT:-150}" python3 "bench/$p.py" >> "$OUT/profiles.log" 2>&1
  echo "$p rc=$?" | tee -a "$OUT/profiles.log"
done
tail -16 "$OUT/profiles.log"
