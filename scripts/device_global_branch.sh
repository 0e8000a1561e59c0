#!/usr/bin/env bash
# On the GPU machine: LongNet's default branches plus its whole-sequence branch (w = N,
# r = N / 2048), whose rate at 2M fits a 2048-position cell and at 8M does not, for two builds
# of cuda_attention_bench run alternately (A B A B), causal and not; then the default branches
# alone for reference (build B). Prints the build, the round and the bench's CSV row.
#   scripts/device_global_branch.sh .device/bin/bench_a .device/bin/bench_b [N,...]
set -uo pipefail
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
a=$1
b=$2
IFS=, read -r -a ns <<< "${3:-2097152,8388608}"
segments=2048,4096,8192,16384,32768
rates=1,2,4,8,16
for round in 1 2; do
  for bin in "$a" "$b"; do
    for n in "${ns[@]}"; do
      for causal in 0 1; do
        "$bin" --n "$n" --causal "$causal" --segments "$segments,$n" --rates "$rates,$((n / 2048))" \
          --iters 10 --warmup-ms 1000 | tail -n +2 | sed "s|^|$(basename "$bin"),r$round,global,|"
      done
    done
  done
done
for n in "${ns[@]}"; do
  for causal in 0 1; do
    "$b" --n "$n" --causal "$causal" --iters 10 --warmup-ms 1000 | tail -n +2 |
      sed "s|^|$(basename "$b"),r1,default,|"
  done
done
