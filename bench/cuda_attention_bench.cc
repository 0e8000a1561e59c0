// Times the fused CUDA kernel with CUDA events (median of repeated launches after warm-up) and
// prints one line per configuration: effective TFLOP/s by DESIGN.md's formula. Used by
// bench/gpu_bench.py, which puts it next to PyTorch baselines in the same run.
//
//   cuda_attention_bench --n 32768,131072 [--heads 16] [--dim 64] [--dtype bf16]
//       [--mode longnet|head_groups] [--causal 0|1] [--segments 2048,4096,...]
//       [--rates 1,2,...] [--iters 20] [--warmup-ms 0]

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"

namespace {

using dilattn::bench::FillRandom;
using dilattn::bench::Ints;
using dilattn::bench::TimeMs;

}  // namespace

int main(int argc, char** argv) {
  dilattn::bench::ProblemFlags flags;
  flags.ns = {32768};
  std::string mode = "longnet";
  bool causal = false;
  std::vector<int64_t> segments = {2048, 4096, 8192, 16384, 32768};
  std::vector<int64_t> rates = {1, 2, 4, 8, 16};
  dilattn::bench::ParseFlags(argc, argv, &flags,
                             [&](const std::string& flag, const std::string& value) {
                               if (flag == "--mode")
                                 mode = value;
                               else if (flag == "--causal") causal = value == "1";
                               else if (flag == "--segments")
                                 segments = Ints(value);
                               else if (flag == "--rates")
                                 rates = Ints(value);
                               else
                                 return false;
                               return true;
                             });
  const auto& [ns, heads, dim, iters, warmup_ms, dtype] = flags;
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  auto backend = dilattn::attention::CreateCudaBackend({0, stream});
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
    return 1;
  }
  std::printf("kernel,mode,causal,dtype,N,H,D,ms,tflops,host_plan_ms\n");
  for (int64_t n : ns) {
    dilattn::attention::AttentionOptions o;
    o.segment_lengths = segments;
    o.dilation_rates = rates;
    o.mode = *dilattn::attention::ParseMode(mode);
    o.causal = causal;
    auto plan = dilattn::attention::PlanAttention(
        o, dilattn::attention::DenseShape(*dilattn::attention::ParseDType(dtype), 1, n, heads, dim));
    if (!plan.ok()) {
      std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
      return 1;
    }
    const size_t bytes = plan->tensor_bytes;
    void *q, *k, *v, *out, *ws;
    CHECK_CUDA(cudaMalloc(&q, bytes));
    CHECK_CUDA(cudaMalloc(&k, bytes));
    CHECK_CUDA(cudaMalloc(&v, bytes));
    CHECK_CUDA(cudaMalloc(&out, bytes));
    const size_t ws_bytes = std::max<size_t>(1, (*backend)->WorkspaceBytes(*plan));
    CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    FillRandom(q, bytes, 1);
    FillRandom(k, bytes, 2);
    FillRandom(v, bytes, 3);
    const dilattn::DeviceLoc dev = dilattn::DeviceLoc::Cuda(0);
    const dilattn::attention::AttentionTensors t{{q, bytes, dev}, {k, bytes, dev},
                                                  {v, bytes, dev}, {out, bytes, dev}};
    const double median = TimeMs(
        stream, iters,
        [&] {
          return (*backend)->Run(*plan, t, {ws, ws_bytes, dev});
        },
        warmup_ms);
    // The host's share of a run: planning the tile list (it precedes the upload and the launch).
    std::vector<dilattn::attention::GpuTile> tiles;
    const auto t0 = std::chrono::steady_clock::now();
    (void)dilattn::attention::BuildGpuTiles(*plan, dim <= 128 ? 128 : 64, &tiles);
    const std::chrono::duration<double, std::milli> host = std::chrono::steady_clock::now() - t0;
    std::printf("dilattn,%s,%d,%s,%lld,%lld,%lld,%.4f,%.1f,%.3f\n", mode.c_str(), causal ? 1 : 0,
                dtype.c_str(), static_cast<long long>(n), static_cast<long long>(heads),
                static_cast<long long>(dim), median, plan->flops / (median * 1e-3) / 1e12,
                host.count());
    std::fflush(stdout);
    cudaFree(q);
    cudaFree(k);
    cudaFree(v);
    cudaFree(out);
    cudaFree(ws);
  }
  return 0;
}
