// Times block-sparse attention on the fused CUDA kernels (CUDA events, median of repeated runs
// after warm-up) over patterns of falling density, next to dense attention on the same kernel
// (one branch, segment N, rate 1) in the same run, and prints one CSV line per configuration:
// kept block pairs, the share of the dense pairs they are, the time, the time over dense, and
// effective TFLOP/s over the visible pairs. Skipped pairs should cost nothing: time over dense
// should follow the kept share.
//
//   cuda_block_sparse_bench [--n 32768,131072] [--heads 16] [--dim 64] [--dtype bf16]
//       [--block 128] [--causal 0|1] [--iters 20] [--warmup-ms 0]

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "kernels/attention/attention.h"
#include "kernels/block_sparse/block_sparse.h"

namespace {

using dilattn::bench::FillRandom;
using dilattn::bench::Ints;
using dilattn::bench::TimeMs;

using dilattn::attention::AttentionTensors;
using dilattn::block_sparse::BlockSparseOptions;
using dilattn::block_sparse::Pattern;


template <class T>
T OrDie(absl::StatusOr<T> v) {
  if (!v.ok()) {
    std::fprintf(stderr, "%s\n", v.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(v);
}



}  // namespace

int main(int argc, char** argv) {
  dilattn::bench::ProblemFlags flags;
  flags.ns = {32768, 131072};
  int64_t block = 128;
  bool causal = false;
  dilattn::bench::ParseFlags(argc, argv, &flags,
                             [&](const std::string& flag, const std::string& value) {
                               if (flag == "--block")
                                 block = Ints(value)[0];
                               else if (flag == "--causal")
                                 causal = value == "1";
                               else
                                 return false;
                               return true;
                             });
  const auto& [ns, heads, dim, iters, warmup_ms, dtype] = flags;
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  auto sparse = OrDie(dilattn::block_sparse::CreateCudaBlockSparseBackend({0, stream}));
  auto dense = OrDie(dilattn::attention::CreateCudaBackend({0, stream}));
  const dilattn::DeviceLoc dev = dilattn::DeviceLoc::Cuda(0);
  std::printf(
      "kernel,pattern,causal,dtype,N,H,D,block,kept_pairs,kept_share,ms,ms_over_dense,"
      "tflops\n");
  for (int64_t n : ns) {
    const auto shape = dilattn::attention::DenseShape(OrDie(dilattn::attention::ParseDType(dtype)),
                                                      1, n, heads, dim);
    dilattn::attention::AttentionOptions dense_options;
    dense_options.segment_lengths = {n};
    dense_options.dilation_rates = {1};
    dense_options.causal = causal;
    const auto dense_plan = OrDie(dilattn::attention::PlanAttention(dense_options, shape));
    const size_t bytes = dense_plan.tensor_bytes;
    void *q, *k, *v, *out;
    for (void** p : {&q, &k, &v, &out}) CHECK_CUDA(cudaMalloc(p, bytes));
    FillRandom(q, bytes, 1);
    FillRandom(k, bytes, 2);
    FillRandom(v, bytes, 3);
    const AttentionTensors t{{q, bytes, dev}, {k, bytes, dev}, {v, bytes, dev}, {out, bytes, dev}};
    const int64_t blocks = (n + block - 1) / block;
    const double dense_pairs = causal ? blocks * (blocks + 1) / 2.0 : double(blocks) * blocks;

    void* dense_ws;
    const size_t dense_ws_bytes = std::max<size_t>(1, dense->WorkspaceBytes(dense_plan));
    CHECK_CUDA(cudaMalloc(&dense_ws, dense_ws_bytes));
    const double dense_ms = TimeMs(
        stream, iters,
        [&] {
          return dense->Run(dense_plan, t, {dense_ws, dense_ws_bytes, dev});
        },
        warmup_ms);
    cudaFree(dense_ws);
    std::printf("dense,-,%d,%s,%lld,%lld,%lld,%lld,%.0f,1.000,%.4f,1.000,%.1f\n", causal ? 1 : 0,
                dtype.c_str(), static_cast<long long>(n), static_cast<long long>(heads),
                static_cast<long long>(dim), static_cast<long long>(block), dense_pairs, dense_ms,
                dense_plan.flops / (dense_ms * 1e-3) / 1e12);
    std::fflush(stdout);

    std::vector<std::pair<std::string, BlockSparseOptions>> patterns;
    auto add = [&](std::string name, auto set) {
      BlockSparseOptions o;
      o.block_size = block;
      o.causal = causal;
      set(o);
      patterns.emplace_back(std::move(name), o);
    };
    for (double d : {0.5, 0.25, 0.1}) {
      add(absl::StrCat("random(", d, ")"), [&](BlockSparseOptions& o) {
        o.pattern = Pattern::kRandom;
        o.density = d;
        o.seed = 1;
      });
    }
    add("local_window(8)", [](BlockSparseOptions& o) {
      o.pattern = Pattern::kLocalWindow;
      o.window = 8;
    });
    add("global_local(4,8)", [](BlockSparseOptions& o) {
      o.pattern = Pattern::kGlobalLocal;
      o.global_blocks = 4;
      o.window = 8;
    });
    add("strided(8)", [](BlockSparseOptions& o) {
      o.pattern = Pattern::kStrided;
      o.stride = 8;
    });
    add("dilated_sparse(1,2,4,8,16)", [](BlockSparseOptions& o) {
      o.pattern = Pattern::kDilatedSparse;
      o.rates = {1, 2, 4, 8, 16};
    });
    for (const auto& [name, options] : patterns) {
      const auto plan = OrDie(dilattn::block_sparse::PlanBlockSparse(options, shape));
      const size_t ws_bytes = std::max<size_t>(1, sparse->WorkspaceBytes(plan));
      void* ws;
      CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
      const double ms = TimeMs(
          stream, iters,
          [&] {
            return sparse->Run(plan, t, {ws, ws_bytes, dev});
          },
          warmup_ms);
      cudaFree(ws);
      // The pattern's name holds commas: quoted, as CSV quotes a field.
      std::printf("dilattn,\"%s\",%d,%s,%lld,%lld,%lld,%lld,%lld,%.3f,%.4f,%.3f,%.1f\n", name.c_str(),
                  causal ? 1 : 0, dtype.c_str(), static_cast<long long>(n),
                  static_cast<long long>(heads), static_cast<long long>(dim),
                  static_cast<long long>(block), static_cast<long long>(plan.kept_pairs),
                  plan.kept_pairs / dense_pairs, ms, ms / dense_ms,
                  plan.flops / (ms * 1e-3) / 1e12);
      std::fflush(stdout);
    }
    for (void* p : {q, k, v, out}) cudaFree(p);
  }
  return 0;
}
