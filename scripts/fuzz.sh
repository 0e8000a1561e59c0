#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers a client reaches (tests/fuzz), with libFuzzer, ASan and
# UBSan: a clang build in build-fuzz/, each target run for SECONDS (default 300) from the
# committed corpus and the seeds, then the corpus merged back into tests/fuzz/corpus/<target>
# (only inputs that add coverage are kept). A crash leaves crash-* files in build-fuzz/ and
# stops the script; commit the input into the corpus with the fix, so every build replays it.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-300}
build="$root/build-fuzz"
mkdir -p "$build"
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -g -O1"
prom=$(ls -d "$root"/third_party/prometheus-cpp/usr/lib/*/cmake/prometheus-cpp 2>/dev/null | head -1)
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DDILATTN_WITH_CUDA=OFF -DDILATTN_WITH_BENCHMARKS=OFF -DDILATTN_FUZZERS=ON \
  ${prom:+-Dprometheus-cpp_DIR="$prom"} > "$build/configure.log"
cmake --build "$build" -j"$(nproc)" --target fuzz_InferRequest fuzz_AttendRequest fuzz_Stream
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
declare -A corpus=([InferRequest]=infer_request [AttendRequest]=attend_request [Stream]=stream)
for target in ${DILATTN_FUZZ_TARGETS:-InferRequest AttendRequest Stream}; do
  committed="$root/tests/fuzz/corpus/${corpus[$target]}"
  work="$build/corpus/${corpus[$target]}"
  mkdir -p "$committed" "$work"
  DILATTN_FUZZ_WRITE_SEEDS="$work" "$build/tests/fuzz_$target"
  (cd "$build" && "./tests/fuzz_$target" -max_total_time="$seconds" -max_len=4096 \
    -print_final_stats=1 "$work" "$committed")
  merged="$build/corpus/${corpus[$target]}.merged"
  rm -rf "$merged" && mkdir -p "$merged"
  "$build/tests/fuzz_$target" -merge=1 "$merged" "$committed" "$work" 2>&1 | tail -1
  rm -rf "$committed" && mv "$merged" "$committed"
done
