#!/usr/bin/env bash
# On the GPU machine, from the repository root, after
#   scripts/device_bundle.sh --e2e build/server/dilattn-server
# ran here: one large request at a time through the real server, its tensors in system shared
# memory (and in the messages up to 128K), with long jobs in pieces (the default) and without
# (--pipeline-min-tokens 0), in alternating order; bench/server_overhead.py prints each table.
#   bash scripts/device_pipeline.sh [N,...]   (default 131072,524288,2097152)
set -uo pipefail
ns=${1:-131072,524288,2097152}
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run=0
bench() {
  run=$((run + 1))
  python3 bench/server_overhead.py --server .device/bin/dilattn-server \
    --server-log "${OUT:-/tmp}/server_$run.log" "$@" 2>&1
  grep -h "pageable\|pieces" "${OUT:-/tmp}/server_$run.log"
}
off="--pipeline-min-tokens 0"
for flags in "$off" "" "" "$off"; do
  bench --ns "$ns" --shm system --server-args "$flags"
done
bench --ns 131072 --server-args "--pipeline-min-tokens 0"
bench --ns 131072
