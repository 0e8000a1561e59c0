set -uo pipefail
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export DILATTN_CONFORMANCE_DIR="$PWD/.device/conformance"
./.device/bin/kernel_tests --gtest_brief=1 2>&1 | tail -3
./.device/bin/cuda_attention_bench --n 32768,131072,524288
./.device/bin/cuda_attention_bench --n 131072 --mode head_groups | tail -1
ncu --clock-control none -k regex:FusedForward -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats ./.device/bin/cuda_attention_bench --n 131072 --iters 1 > $OUT/ncu.txt 2>&1
grep -E "Throughput|Duration|Occupancy|Registers|Stall|Issued|Eligible|Active Warps|Hit Rate|Pipe|Bandwidth|Warp Cycles" $OUT/ncu.txt | head -60
