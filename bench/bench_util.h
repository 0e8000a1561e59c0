#pragma once

// What the CUDA benchmarks share: integer-list flags, CUDA calls that end the program on error,
// and inputs filled once on the host.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/attention/dtype.h"

namespace dilattn::bench {

inline std::vector<int64_t> Ints(const std::string& s) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    int64_t x = 0;
    if (!absl::SimpleAtoi(part, &x)) {
      std::fprintf(stderr, "not an integer list: %s\n", s.c_str());
      std::exit(2);
    }
    out.push_back(x);
  }
  return out;
}

// The flags every CUDA benchmark takes; each sets its own defaults before parsing.
struct ProblemFlags {
  std::vector<int64_t> ns;  // sequence lengths, one table row each
  int64_t heads = 16;
  int64_t dim = 64;
  int64_t iters = 20;
  // Warm-up before timing: at least 3 runs and at least this long, so that a long kernel is timed
  // at the clocks the card sustains under load, as bench/gpu_bench.py times the peers.
  int64_t warmup_ms = 0;
  std::string dtype = "bf16";
};

// Reads argv as --flag value pairs: the shared flags into `f`, the others through `extra`, which
// returns false for a flag it does not know. An unknown flag ends the program with status 2.
inline void ParseFlags(
    int argc, char** argv, ProblemFlags* f,
    const std::function<bool(const std::string& flag, const std::string& value)>& extra) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--n") {
      f->ns = Ints(value);
    } else if (flag == "--heads") {
      f->heads = Ints(value)[0];
    } else if (flag == "--dim") {
      f->dim = Ints(value)[0];
    } else if (flag == "--iters") {
      f->iters = Ints(value)[0];
    } else if (flag == "--warmup-ms") {
      f->warmup_ms = Ints(value)[0];
    } else if (flag == "--dtype") {
      f->dtype = value;
    } else if (!extra(flag, value)) {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
  }
}

#define CHECK_CUDA(x)                                                      \
  do {                                                                     \
    cudaError_t e_ = (x);                                                  \
    if (e_ != cudaSuccess) {                                               \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

// Values in [-1, 1) as bf16 bit patterns (read as fp16 they are as good as any random data),
// generated on the host once per tensor.
inline void FillRandom(void* dst, size_t bytes, uint64_t seed) {
  std::vector<uint16_t> host(bytes / 2);
  uint64_t state = seed;
  for (uint16_t& h : host) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const float u = static_cast<float>((state >> 40) & 0xffffff) / 16777216.0f * 2 - 1;
    h = attention::FloatToBFloat16Bits(u);
  }
  CHECK_CUDA(cudaMemcpy(dst, host.data(), bytes, cudaMemcpyHostToDevice));
}

// Median milliseconds of `run` on `stream` over `iters` runs, after warm-up runs (at least 3, and
// at least `warmup_ms` of them end to end). Each run is timed alone, synchronised, as the Python
// harness times the peers.
inline double TimeMs(cudaStream_t stream, int64_t iters, const std::function<absl::Status()>& run,
                     int64_t warmup_ms = 0) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  auto once = [&] {
    CHECK_CUDA(cudaEventRecord(start, stream));
    if (absl::Status s = run(); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      std::exit(1);
    }
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float x = 0;
    CHECK_CUDA(cudaEventElapsedTime(&x, start, stop));
    return x;
  };
  const auto warm_start = std::chrono::steady_clock::now();
  for (int warm = 0; warm < 3 || std::chrono::steady_clock::now() - warm_start <
                                     std::chrono::milliseconds(warmup_ms);
       ++warm) {
    once();
  }
  std::vector<float> ms;
  for (int64_t it = 0; it < iters; ++it) ms.push_back(once());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace dilattn::bench
