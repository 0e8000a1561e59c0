// Times the fused CUDA kernel with CUDA events (median of repeated launches after warm-up) and
// prints one line per configuration: effective TFLOP/s by DESIGN.md's formula. Used by
// bench/gpu_bench.py, which puts it next to PyTorch baselines in the same run.
//
//   cuda_attention_bench --n 32768,131072 [--heads 16] [--dim 64] [--dtype bf16]
//       [--mode longnet|head_groups] [--causal 0|1] [--segments 2048,4096,...]
//       [--rates 1,2,...] [--iters 20]

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"

namespace {

using dilattn::attention::DType;

std::vector<int64_t> Ints(const std::string& s) {
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

#define CHECK_CUDA(x)                                                              \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_));         \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

void FillRandom(void* dst, size_t bytes, uint64_t seed) {
  // Values in [-1, 1) as fp16 or bf16 bit patterns generated on the host once per tensor.
  std::vector<uint16_t> host(bytes / 2);
  uint64_t state = seed;
  for (uint16_t& h : host) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const float u = static_cast<float>((state >> 40) & 0xffffff) / 16777216.0f * 2 - 1;
    h = dilattn::attention::FloatToBFloat16Bits(u);
  }
  CHECK_CUDA(cudaMemcpy(dst, host.data(), bytes, cudaMemcpyHostToDevice));
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> ns = {32768};
  int64_t heads = 16, dim = 64, iters = 20;
  std::string dtype = "bf16", mode = "longnet";
  bool causal = false;
  std::vector<int64_t> segments = {2048, 4096, 8192, 16384, 32768};
  std::vector<int64_t> rates = {1, 2, 4, 8, 16};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--n") ns = Ints(value);
    else if (flag == "--heads") heads = Ints(value)[0];
    else if (flag == "--dim") dim = Ints(value)[0];
    else if (flag == "--iters") iters = Ints(value)[0];
    else if (flag == "--dtype") dtype = value;
    else if (flag == "--mode") mode = value;
    else if (flag == "--causal") causal = value == "1";
    else if (flag == "--segments") segments = Ints(value);
    else if (flag == "--rates") rates = Ints(value);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
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
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    std::vector<float> ms;
    for (int64_t it = 0; it < iters + 3; ++it) {
      CHECK_CUDA(cudaEventRecord(start, stream));
      auto s = (*backend)->Run(*plan, t, {ws, ws_bytes, dev});
      if (!s.ok()) {
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
        return 1;
      }
      CHECK_CUDA(cudaEventRecord(stop, stream));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float x = 0;
      CHECK_CUDA(cudaEventElapsedTime(&x, start, stop));
      if (it >= 3) ms.push_back(x);
    }
    std::sort(ms.begin(), ms.end());
    const double median = ms[ms.size() / 2];
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
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  return 0;
}
