#!/usr/bin/env bash
# On the GPU machine: two builds of cuda_attention_bench, run alternately (A B A B) on the same
# card over the configurations the issue's targets name, so that clock drift between runs hits
# both alike. Prints one line per run: build, config, then the bench's CSV row.
#   scripts/device_ab.sh .device/bin/bench_a .device/bin/bench_b [--n 32768,131072] [--dim 64]
set -uo pipefail
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
a=$1
b=$2
shift 2
ns=32768,131072
dim=64
while [[ $# -ge 2 ]]; do
  case $1 in
    --n) ns=$2 ;;
    --dim) dim=$2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
  shift 2
done
hg=(--mode head_groups --segments 2048,4096,8192,16384,32768 --rates 1,2,4,8,16)
for round in 1 2; do
  for bin in "$a" "$b"; do
    for cfg in "longnet 0" "longnet 1" "head_groups 0" "head_groups 1"; do
      set -- $cfg
      extra=()
      [[ $1 == head_groups ]] && extra=("${hg[@]}")
      "$bin" --n "$ns" --dim "$dim" --causal "$2" --iters 20 "${extra[@]}" | tail -n +2 |
        sed "s|^|$(basename "$bin"),r$round,|"
    done
  done
done
