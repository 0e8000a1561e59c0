#!/usr/bin/env bash
# Packs what the lent GPU machine needs into .device/ (git-ignored; pass `carry: [".device"]`):
# binaries built here with their shared libraries (all but glibc and the C++ runtime, which that
# machine has in newer versions, and cuBLAS, which its CUDA toolkit has: /usr/local/cuda/lib64), the conformance data, and with --e2e the end-to-end tools
# (perf_analyzer, Prometheus and promtool xz-compressed, tritonclient wheels for Python 3.12,
# dilattn-client and the native API's Python messages). Binaries are stripped: the bundle must
# stay within the 64 MiB a run carries.
#   scripts/device_bundle.sh [--e2e] BINARY...
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$root/.device"
e2e=0
if [[ ${1:-} == --e2e ]]; then
  e2e=1
  shift
fi
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
# shellcheck source=scripts/runtime_libs.sh
source "$root/scripts/runtime_libs.sh"
for bin in "$@"; do
  strip -o "$out/bin/$(basename "$bin")" "$bin"
  copy_runtime_libs "$bin" "$out/lib" --no-toolkit
done
cp -r "$root/../shared/conformance" "$out/conformance"
if [[ $e2e == 1 ]]; then
  # The native stream's Python messages and the C++ client (tests/e2e/test_attend.py).
  cp -r "$root/build/python" "$out/python"
  strip -o "$out/bin/dilattn-client" "$root/build/client/dilattn-client"
  mkdir -p "$out/perf_analyzer/bin" "$out/perf_analyzer/lib" "$out/tools" "$out/wheels"
  cp "$root"/third_party/perf_analyzer/lib/* "$out/perf_analyzer/lib/"
  cp -L "$(ldconfig -p | awk '/libb64.so.0d/ {print $NF; exit}')" "$out/perf_analyzer/lib/"
  xz -T0 -6 -c "$root/third_party/perf_analyzer/bin/perf_analyzer" > "$out/perf_analyzer/bin/perf_analyzer.xz"
  for t in prometheus promtool; do xz -T0 -6 -c "$(command -v $t)" > "$out/tools/$t.xz"; done
  # The two packages that machine's Python lacks, at the versions and hashes of the lock.
  awk '/^(tritonclient|python-rapidjson)==/ {on = 1} on {print} on && !/\\$/ {on = 0}' \
    "$root/tests/e2e/requirements.lock" > "$out/wheels.lock"
  python3 -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$out/wheels" -r "$out/wheels.lock"
  rm "$out/wheels.lock"
fi
du -sh "$out"
