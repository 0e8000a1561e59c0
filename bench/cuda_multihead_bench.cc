// Times the GPU multihead module (projections on cuBLASLt, the fused attention between them) with
// CUDA events, and the attention alone on the same shape, and prints one CSV line per N: where the
// module's time goes. Random weights (xavier-scaled), bf16 or fp16. A head dim without a kernel
// (96, say) runs padded, in the module and in the attention timed alone.
//
//   cuda_multihead_bench --n 32768,131072 [--heads 16] [--dim 64] [--dtype bf16] [--norm 1]
//       [--causal 0|1] [--segments 2048,...] [--rates 1,...] [--iters 20] [--warmup-ms 0]

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/attention/padded_plan.h"
#include "kernels/multihead/multihead.h"

namespace {

using dilattn::bench::FillRandom;
using dilattn::bench::Ints;
using dilattn::bench::TimeMs;

std::shared_ptr<const dilattn::multihead::MultiheadWeights> RandomWeights(int64_t e, int64_t h,
                                                                          bool norm) {
  auto w = std::make_shared<dilattn::multihead::MultiheadWeights>();
  w->embed_dim = e;
  w->num_heads = h;
  w->id = 1;
  w->source = "random";
  uint64_t state = 42;
  auto next = [&](float scale) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (static_cast<float>((state >> 40) & 0xffffff) / 16777216.0f * 2 - 1) * scale;
  };
  const float scale = static_cast<float>(std::sqrt(3.0 / static_cast<double>(e)));
  for (auto* m : {&w->wt_q, &w->wt_k, &w->wt_v, &w->wt_out}) {
    m->resize(static_cast<size_t>(e * e));
    for (float& x : *m) x = next(scale);
  }
  for (auto* b : {&w->b_q, &w->b_k, &w->b_v, &w->b_out}) {
    b->resize(static_cast<size_t>(e));
    for (float& x : *b) x = next(0.1f);
  }
  w->layer_norm = norm;
  w->ln_weight.assign(static_cast<size_t>(e), 1.0f);
  w->ln_bias.assign(static_cast<size_t>(e), 0.0f);
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  dilattn::bench::ProblemFlags flags;
  flags.ns = {32768};
  bool causal = false, norm = true;
  std::vector<int64_t> segments = {2048, 4096, 8192, 16384, 32768};
  std::vector<int64_t> rates = {1, 2, 4, 8, 16};
  dilattn::bench::ParseFlags(argc, argv, &flags,
                             [&](const std::string& flag, const std::string& value) {
                               if (flag == "--causal")
                                 causal = value == "1";
                               else if (flag == "--norm")
                                 norm = value == "1";
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
  auto module = dilattn::multihead::CreateCudaMultiheadBackend({0, stream});
  auto attention = dilattn::attention::CreateCudaBackend({0, stream});
  if (!module.ok() || !attention.ok()) {
    std::fprintf(stderr, "%s %s\n", module.status().ToString().c_str(),
                 attention.status().ToString().c_str());
    return 1;
  }
  const int64_t e = heads * dim;
  auto weights = RandomWeights(e, heads, norm);
  std::printf("impl,dtype,causal,norm,N,H,D,E,ms,attention_ms,projection_ms,tflops\n");
  for (int64_t n : ns) {
    dilattn::attention::AttentionOptions o;
    o.segment_lengths = segments;
    o.dilation_rates = rates;
    o.causal = causal;
    auto plan = dilattn::multihead::PlanMultihead(
        weights, o,
        dilattn::attention::DenseShape(*dilattn::attention::ParseDType(dtype), 1, n, heads, dim));
    if (!plan.ok()) {
      std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
      return 1;
    }
    const size_t bytes = plan->tensor_bytes;
    const size_t ws_bytes = (*module)->WorkspaceBytes(*plan);
    void *x, *y, *ws;
    CHECK_CUDA(cudaMalloc(&x, bytes));
    CHECK_CUDA(cudaMalloc(&y, bytes));
    CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    FillRandom(x, bytes, 1);
    const dilattn::DeviceLoc dev = dilattn::DeviceLoc::Cuda(0);
    const double total = TimeMs(
        stream, iters,
        [&] {
          return (*module)->Run(*plan, {{x, bytes, dev}, {y, bytes, dev}}, {ws, ws_bytes, dev});
        },
        warmup_ms);
    // The attention alone, on the module's own Q, K, V (the first three workspace slices), at
    // the head dim the module runs it (padded where D has no kernel).
    absl::StatusOr<dilattn::attention::AttentionPlan> as_run =
        dilattn::attention::PlanAsRun(plan->attention, **attention);
    if (!as_run.ok()) {
      std::fprintf(stderr, "%s\n", as_run.status().ToString().c_str());
      return 1;
    }
    const dilattn::attention::AttentionPlan& att_plan = *as_run;
    const size_t att_bytes = att_plan.tensor_bytes;
    const size_t step = (att_bytes + 255) / 256 * 256;
    auto* base = static_cast<unsigned char*>(ws);
    const size_t att_ws = (*attention)->WorkspaceBytes(att_plan);
    void *att_scratch, *att_out;
    CHECK_CUDA(cudaMalloc(&att_scratch, std::max<size_t>(1, att_ws)));
    CHECK_CUDA(cudaMalloc(&att_out, att_bytes));
    const double att = TimeMs(
        stream, iters,
        [&] {
          return (*attention)
              ->Run(att_plan,
                    {{base, att_bytes, dev},
                     {base + step, att_bytes, dev},
                     {base + 2 * step, att_bytes, dev},
                     {att_out, att_bytes, dev}},
                    {att_scratch, std::max<size_t>(1, att_ws), dev});
        },
        warmup_ms);
    std::printf("dilattn,%s,%d,%d,%lld,%lld,%lld,%lld,%.4f,%.4f,%.4f,%.1f\n", dtype.c_str(),
                causal ? 1 : 0, norm ? 1 : 0, static_cast<long long>(n),
                static_cast<long long>(heads), static_cast<long long>(dim),
                static_cast<long long>(e), total, att, total - att,
                plan->flops / (total * 1e-3) / 1e12);
    std::fflush(stdout);
    cudaFree(x);
    cudaFree(y);
    cudaFree(ws);
    cudaFree(att_scratch);
    cudaFree(att_out);
  }
  return 0;
}
