#!/usr/bin/env bash
# On the GPU machine, from the repository root, after scripts/device_bundle.sh ran here:
# kernel tests, compute-sanitizer on the small set, a first timing, and (with an argument) the
# full comparison benchmark. Logs go to $OUT.
set -uo pipefail
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export DILATTN_CONFORMANCE_DIR="$PWD/.device/conformance"
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
./.device/bin/kernel_tests --gtest_brief=1 2>&1 | tee "$out/kernel_tests.log" | tail -5
for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 ./.device/bin/kernel_tests \
    --gtest_filter='FusedForward.SanitizerSet:BlockSparseGpu.SanitizerSet:CudaMultihead.SanitizerSet' > "$out/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $?; $(grep -h 'SUMMARY' "$out/sanitizer_$tool.log")"
done
./.device/bin/cuda_attention_bench --n 32768,131072,524288 2>&1 | tee "$out/bench.csv"
if [[ ${1:-} != "" ]]; then
  PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py --binary ./.device/bin/cuda_attention_bench \
    --out-dir "$out" "$@" 2>&1 | tee "$out/gpu_bench.txt" | grep -v '^done'
fi
