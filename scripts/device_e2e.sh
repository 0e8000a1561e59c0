#!/usr/bin/env bash
# On the GPU machine, from the repository root, after
#   scripts/device_bundle.sh --e2e build/tests/kernel_tests build/bench/cuda_attention_bench \
#     build/server/dilattn-server
# ran here: kernel tests, compute-sanitizer, the end-to-end suite on the GPU backend, and the
# server-side overhead table (with --e2e-only, the end-to-end suite alone). Logs go to $OUT.
# DILATTN_E2E_FILES (default tests/e2e) picks test files, to split the suite over calls.
set -uo pipefail
all=1
[[ ${1:-} == --e2e-only ]] && all=0
out=${OUT:-/tmp}
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export DILATTN_CONFORMANCE_DIR="$PWD/.device/conformance"
mkdir -p /tmp/tools
for t in prometheus promtool; do xz -dc ".device/tools/$t.xz" > "/tmp/tools/$t"; chmod +x "/tmp/tools/$t"; done
xz -dkf .device/perf_analyzer/bin/perf_analyzer.xz && chmod +x .device/perf_analyzer/bin/perf_analyzer
export PATH="/tmp/tools:$PATH"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ $all == 1 ]]; then
  ./.device/bin/kernel_tests --gtest_brief=1 2>&1 | tail -1
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 ./.device/bin/kernel_tests \
      --gtest_filter='FusedForward.SanitizerSet:FusedForward.ScoresRising*:BlockSparseGpu.SanitizerSet:CudaMultihead.SanitizerSet' > "$out/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $?; $(grep -h 'SUMMARY' "$out/sanitizer_$tool.log")"
  done
  # Two GPUs: the sequence-parallel runner's copies and exchange. NCCL probes kernel images with
  # cudaFuncGetAttributes and expects some to be missing; those API errors are not ours.
  if (( $(nvidia-smi -L | grep -c '^GPU ') >= 2 )); then
    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
      ./.device/bin/kernel_tests --gtest_filter='SequenceParallel.PaddedHeadDimsMatchTheCpuPath:SequenceParallel.EachGpuHoldsOnlyItsSliceWhereNoSegmentSpans' \
      > "$out/sanitizer_sequence_parallel.log" 2>&1
    echo "compute-sanitizer memcheck, sequence parallelism: exit $?; $(grep -h 'SUMMARY' "$out/sanitizer_sequence_parallel.log")"
  fi
fi
DILATTN_E2E_DEVICE=cuda DILATTN_SERVER_BIN="$PWD/.device/bin/dilattn-server" \
DILATTN_CLIENT_BIN="$PWD/.device/bin/dilattn-client" DILATTN_PYTHON_PROTO="$PWD/.device/python" \
DILATTN_PERF_ANALYZER_HOME="$PWD/.device/perf_analyzer" DILATTN_E2E_RESULTS="$out/e2e" \
  timeout "${DILATTN_E2E_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider -rfEs ${DILATTN_E2E_FILES:-tests/e2e} 2>&1 | grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" | tail -40
[[ $all == 1 ]] || exit 0
python3 bench/server_overhead.py --server .device/bin/dilattn-server --ns 32768,131072 2>&1 | tail -4
python3 bench/server_overhead.py --server .device/bin/dilattn-server --ns 32768,131072 --shm cuda 2>&1 | tail -4
