#!/usr/bin/env bash
# On a machine with two or more GPUs, from the repository root, after
#   scripts/device_bundle.sh --e2e build/tests/kernel_tests build/server/dilattn-server
# ran here: the sequence-parallel kernel tests, the multi-GPU end-to-end tests, and server-side
# time of one long sequence on one GPU and split across all of them
# (--sequence-parallel-min-tokens). Logs go to $OUT.
set -uo pipefail
out=${OUT:-/tmp}
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export DILATTN_CONFORMANCE_DIR="$PWD/.device/conformance"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
./.device/bin/kernel_tests --gtest_filter='SequenceParallel*' --gtest_brief=1 2>&1 | tail -1
DILATTN_E2E_DEVICE=cuda DILATTN_SERVER_BIN="$PWD/.device/bin/dilattn-server" \
DILATTN_E2E_RESULTS="$out/e2e" timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE \
  tests/e2e/test_multi_gpu.py 2>&1 | tail -3
# Tensors in the request messages (host memory, which one GPU copies whole and a split copies
# in halves, one per GPU): H = 4 keeps three 1M-token tensors within one 2 GiB message.
ns=${1:-524288,1048576}
echo "one GPU (cuda:0):"
python3 bench/server_overhead.py --server .device/bin/dilattn-server --device cuda:0 --heads 4 \
  --ns "$ns" 2>&1 | tail -3
echo "every GPU, split (--sequence-parallel-min-tokens 262144):"
python3 bench/server_overhead.py --server .device/bin/dilattn-server --device cuda --heads 4 \
  --ns "$ns" --server-args "--sequence-parallel-min-tokens 262144" 2>&1 | tail -3
