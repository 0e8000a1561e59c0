// Times one long sequence on one GPU and split across every GPU here (sequence parallelism):
// host tensors in, host O out, so each time includes the copies (the runner's whole work),
// median of repeated runs after warm-up (one run, or --warmup-ms); prints a CSV line per N and
// configuration, with the device memory the busiest GPU leased for the run.
//
//   sequence_parallel_bench [--n 1048576,2097152] [--heads 16] [--dim 64] [--dtype bf16]
//       [--iters 5] [--warmup-ms 0]
// Two branch sets: the default LongNet branches (w = 2048..32768; no exchange between GPUs),
// and the same with a global branch (w = N, r = N / 2048) whose dilated rows are exchanged.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cuda/sequence_parallel_runner.h"

namespace {

using dilattn::bench::Ints;

void* PinnedRandom(size_t bytes, uint64_t seed) {
  void* p = nullptr;
  CHECK_CUDA(cudaMallocHost(&p, bytes));
  auto* h = static_cast<uint16_t*>(p);
  uint64_t state = seed;
  for (size_t i = 0; i < bytes / 2; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const float u = static_cast<float>((state >> 40) & 0xffffff) / 16777216.0f * 2 - 1;
    h[i] = dilattn::attention::FloatToBFloat16Bits(u);
  }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  dilattn::bench::ProblemFlags flags;
  flags.ns = {1048576, 2097152};
  flags.iters = 5;
  dilattn::bench::ParseFlags(argc, argv, &flags,
                             [](const std::string&, const std::string&) { return false; });
  const auto& [ns, heads, dim, iters, warmup_ms, dtype] = flags;
  int count = 0;
  CHECK_CUDA(cudaGetDeviceCount(&count));
  std::vector<int> all;
  for (int d = 0; d < count; ++d) all.push_back(d);
  std::printf("branches,N,H,D,gpus,ms,speedup,max_gib_per_gpu\n");
  for (int64_t n : ns) {
    for (bool global : {false, true}) {
      dilattn::attention::AttentionOptions o;
      o.segment_lengths = {2048, 4096, 8192, 16384, 32768};
      o.dilation_rates = {1, 2, 4, 8, 16};
      if (global) {
        o.segment_lengths.push_back(n);
        o.dilation_rates.push_back(std::max<int64_t>(1, n / 2048));
      }
      auto plan = dilattn::attention::PlanAttention(
          o, dilattn::attention::DenseShape(*dilattn::attention::ParseDType(dtype), 1, n, heads,
                                            dim));
      if (!plan.ok()) {
        std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
        return 1;
      }
      const size_t bytes = plan->tensor_bytes;
      void* q = PinnedRandom(bytes, 1);
      void* k = PinnedRandom(bytes, 2);
      void* v = PinnedRandom(bytes, 3);
      void* out = PinnedRandom(bytes, 4);
      const dilattn::DeviceLoc host = dilattn::DeviceLoc::Host();
      const dilattn::attention::AttentionTensors t{
          {q, bytes, host}, {k, bytes, host}, {v, bytes, host}, {out, bytes, host}};
      double one_gpu = 0;
      for (std::vector<int> devices : {std::vector<int>{0}, all}) {
        auto runner = dilattn::attention::cuda::SequenceParallelRunner::Create(devices);
        if (!runner.ok()) {
          std::fprintf(stderr, "%s\n", runner.status().ToString().c_str());
          return 1;
        }
        // Warm-up runs (at least one, and at least --warmup-ms of them), then the timed ones.
        std::vector<double> ms;
        const auto warm_start = std::chrono::steady_clock::now();
        bool warm = false;
        while (static_cast<int64_t>(ms.size()) < iters) {
          const auto t0 = std::chrono::steady_clock::now();
          if (auto s = (*runner)->Run(*plan, t); !s.ok()) {
            std::fprintf(stderr, "%s\n", s.ToString().c_str());
            return 1;
          }
          const auto t1 = std::chrono::steady_clock::now();
          if (warm) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
          warm = warm || t1 - warm_start >= std::chrono::milliseconds(warmup_ms);
        }
        std::sort(ms.begin(), ms.end());
        const double median = ms[ms.size() / 2];
        if (devices.size() == 1) one_gpu = median;
        const std::vector<size_t> held = (*runner)->LastRunDeviceBytes();
        std::printf("%s,%lld,%lld,%lld,%d,%.2f,%.2f,%.3f\n", global ? "longnet+global" : "longnet",
                    static_cast<long long>(n), static_cast<long long>(heads),
                    static_cast<long long>(dim), static_cast<int>(devices.size()), median,
                    one_gpu / median,
                    static_cast<double>(*std::max_element(held.begin(), held.end())) / (1 << 30));
        std::fflush(stdout);
      }
      for (void* p : {q, k, v, out}) cudaFreeHost(p);
    }
  }
  return 0;
}
