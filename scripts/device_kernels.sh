#!/usr/bin/env bash
# On the GPU machine, from the repository root, after scripts/device_bundle.sh ran here:
# kernel tests, compute-sanitizer on the small set, and a first timing. Logs go to $OUT.
set -uo pipefail
export LD_LIBRARY_PATH="$PWD/.device/lib:${LD_LIBRARY_PATH:-}"
export DILATTN_CONFORMANCE_DIR="$PWD/.device/conformance"
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
./.device/bin/kernel_tests --gtest_brief=1 2>&1 | tee "$out/kernel_tests.log" | tail -25
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 ./.device/bin/kernel_tests \
    --gtest_filter='FusedForward.SanitizerSet' > "$out/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$out/sanitizer_$tool.log") clean summaries)"
done
./.device/bin/cuda_attention_bench --n 32768,131072,524288 2>&1 | tee "$out/bench.csv"
./.device/bin/cuda_attention_bench --n 131072 --causal 1 2>&1 | tail -1
