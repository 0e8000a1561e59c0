#!/usr/bin/env bash
# On the GPU machine, from the repository root, after
#   scripts/device_bundle.sh build/tests/kernel_tests build/bench/cuda_attention_bench
# ran here: scripts/device_kernels.sh with the full comparison table (gpu_bench.py), then the
# other head dims and dtypes, the mma.sync variant and N = 8M. Logs go to $OUT.
set -uo pipefail
bash scripts/device_kernels.sh --ns 32768,131072,524288,2097152
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
bench=./.device/bin/cuda_attention_bench
"$bench" --n 131072 --dim 128 | tail -1
"$bench" --n 131072 --dim 32 | tail -1
"$bench" --n 131072 --dtype fp16 | tail -1
DILATTN_CUDA_KERNEL=mma "$bench" --n 131072 | tail -1
"$bench" --n 8388608 --iters 3 | tail -1
