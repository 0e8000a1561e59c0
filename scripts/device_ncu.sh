#!/usr/bin/env bash
# On the GPU machine, from the repository root, after scripts/device_bundle.sh ran here: one
# profiled launch of the fused kernel (default: longnet, N = 128K, bf16, D = 64; extra arguments
# go to cuda_attention_bench) with the sections and pipe metrics BENCHMARKS.md quotes, and the
# SASS instruction mix of the Hopper kernel. Logs go to $OUT.
set -uo pipefail
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
out=${OUT:-/tmp}
metrics=(
  sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
  sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
  sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active
  sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active
  sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active
  sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active
  smsp__issue_active.avg.pct_of_peak_sustained_active
  smsp__inst_executed.sum
  smsp__inst_executed_pipe_xu.sum
  smsp__inst_executed_pipe_fma.sum
  smsp__inst_executed_pipe_alu.sum
  smsp__inst_executed_pipe_lsu.sum
  sm__cycles_elapsed.avg
  lts__t_sector_hit_rate.pct
  dram__throughput.avg.pct_of_peak_sustained_elapsed
)
stalls='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
metric_list="$(IFS=,; echo "${metrics[*]}"),$stalls"
ncu --kernel-name regex:'Forward' --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section LaunchStats --metrics "$metric_list" \
  ./.device/bin/cuda_attention_bench --n 131072 --iters 2 "$@" > "$out/ncu.txt" 2>&1
echo "ncu: exit $?"
shown='stalled|pct_of_peak|\.sum|cycles_elapsed|Throughput|Registers|Achieved Occupancy'
grep -E "$shown|Warp Cycles|Duration" "$out/ncu.txt" | sed 's/  */ /g'
# The bf16 Hopper kernel's SASS alone (the whole binary's is too large to bring back).
cuobjdump -sass .device/bin/cuda_attention_bench |
  awk '/Function : .*HopperForward.*nv_bfloat16/ {p = 1; print; next}
       /Function : / {p = 0}
       p' > "$out/hopper_bf16.sass"
echo "sass: $(wc -l < "$out/hopper_bf16.sass") lines in hopper_bf16.sass"
