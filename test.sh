#!/usr/bin/env bash
# The whole test suite. Run ./setup.sh --no-serve (or ./setup.sh) once first; this script brings
# the builds up to date itself.
#
#   1. release build: unit, conformance and GPU kernel tests (the last skip without a GPU), and
#      the fuzz targets over their committed corpus (tests/fuzz; scripts/fuzz.sh grows it)
#   2. end-to-end: the real server binary with tritonclient, perf_analyzer, Prometheus (pytest)
#   3. AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer) build: unit, conformance,
#      the fuzz corpus, and the server under the end-to-end error, conformance, shutdown,
#      shared-memory and multihead tests (a leak at exit fails them)
#   4. ThreadSanitizer build: the concurrency tests (buffer pool, thread pool, block-sparse layout
#      cache, background input copies, the batcher and the engine threads; the gRPC layer stays
#      out, its Abseil is not instrumented)
#
# Prints each stage's CTest summary; exits non-zero on the first failing stage.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
jobs=$(nproc)
build=${DILATTN_BUILD_DIR:-$root/build}

stage() { printf '\n== %s\n' "$*"; }

configure_and_build() {
  local dir=$1
  shift
  cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
}

stage "release build: unit, conformance, kernels, fuzz corpus"
configure_and_build "$build"
ctest --test-dir "$build" --output-on-failure -j"$jobs" -L 'unit|conformance|kernels|fuzz'

stage "end-to-end: dilattn-server with tritonclient, perf_analyzer, Prometheus"
# Every binary and generated file the tests use from this build, where DILATTN_BUILD_DIR moved it.
DILATTN_SERVER_BIN="$build/server/dilattn-server" DILATTN_CLIENT_BIN="$build/client/dilattn-client" \
DILATTN_PYTHON_PROTO="$build/python" DILATTN_E2E_RESULTS="$build/e2e-results" \
  "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/e2e"

stage "ASan + UBSan + LSan build: unit, conformance, fuzz corpus, server end-to-end"
configure_and_build "$root/build-asan" -DDILATTN_SANITIZE=address,undefined \
  -DDILATTN_WITH_BENCHMARKS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir "$root/build-asan" --output-on-failure -j"$jobs" -L 'unit|conformance|fuzz'
DILATTN_SERVER_BIN="$root/build-asan/server/dilattn-server" \
DILATTN_CLIENT_BIN="$root/build-asan/client/dilattn-client" \
DILATTN_PYTHON_PROTO="$root/build-asan/python" DILATTN_E2E_RESULTS="$root/build-asan/e2e-results" \
  "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/e2e/test_errors.py" \
  "$root/tests/e2e/test_conformance.py" "$root/tests/e2e/test_sigterm.py" \
  "$root/tests/e2e/test_shared_memory.py" "$root/tests/e2e/test_hostile.py" \
  "$root/tests/e2e/test_attend.py" "$root/tests/e2e/test_multihead.py" \
  "$root/tests/e2e/test_tls.py" "$root/tests/e2e/test_connections.py" \
  "$root/tests/e2e/test_batching.py::test_cpu_engines_take_batches_side_by_side"
unset ASAN_OPTIONS UBSAN_OPTIONS

stage "TSan build: concurrency tests"
# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"
fetch_abseil_source "$root/third_party/abseil-src"
configure_and_build "$root/build-tsan" -DDILATTN_SANITIZE=thread \
  -DDILATTN_ABSL_SOURCE_DIR="$root/third_party/abseil-src" \
  -DDILATTN_WITH_BENCHMARKS=OFF -DDILATTN_WITH_SERVER=OFF -DDILATTN_WITH_ENGINE=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
# Quoted inside the options: a checkout path with a space would otherwise split them.
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions='$root/tests/sanitizers/tsan.supp'" \
  ctest --test-dir "$root/build-tsan" --output-on-failure -j"$jobs" \
  -R 'BufferPool|ThreadPool|EngineThreads|EngineDevices|InPlace|InputFill|LayoutCache|MetricsHealth'

stage "all test stages passed"
