// CPU path throughput in effective GFLOP/s (DESIGN.md's FLOP formula), next to OpenBLAS sgemm on
// the same cores in the same run. The sgemm benchmark runs first; every attention benchmark then
// reports its rate as a fraction of sgemm's ("of_sgemm").
//
//   build/bench/cpu_attention_bench [--benchmark_filter=...]   DILATTN_BENCH_THREADS=N to pin
//   the thread count (default: all hardware threads, for both sgemm and attention).

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cpu/tile_runner.h"
#include "kernels/memory/buffer_pool.h"
#include "kernels/multihead/cpu/gemm.h"
#include "kernels/multihead/multihead.h"
#if defined(DILATTN_HAVE_OPENBLAS)
#include <cblas.h>
#endif

namespace dilattn {
namespace {

using attention::DType;
using attention::Mode;

double g_sgemm_gflops = 0;

int Threads() {
  if (const char* t = std::getenv("DILATTN_BENCH_THREADS")) return std::atoi(t);
  return static_cast<int>(std::thread::hardware_concurrency());
}

void FillRandom(void* data, size_t bytes) {
  uint64_t state = 0x1234567;
  auto* words = static_cast<uint16_t*>(data);
  for (size_t i = 0; i < bytes / 2; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    // Small finite values in every dtype: a bf16/fp16 pattern of magnitude < 1, and for fp32 the
    // pairs form floats of magnitude < 1 as well.
    words[i] = static_cast<uint16_t>(0x3800 + ((state >> 33) & 0x03ff)) ^
               static_cast<uint16_t>(((state >> 20) & 1) << 15);
  }
}

#if defined(DILATTN_HAVE_OPENBLAS)
void BM_OpenBlasSgemm(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  openblas_set_num_threads(Threads());
  std::vector<float> a(static_cast<size_t>(n) * n), b(a.size()), c(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = static_cast<float>(i % 7) * 0.1f;
    b[i] = static_cast<float>(i % 5) * 0.1f;
  }
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(),
                n, 0.0f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
  }
  const double flops = 2.0 * n * n * n;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = Threads();
}

// sgemm's rate measured once up front (median of 5 after a warm-up), for the of_sgemm column.
double MeasureSgemmGflops(int n) {
  openblas_set_num_threads(Threads());
  std::vector<float> a(static_cast<size_t>(n) * n, 0.5f), b(a.size(), 0.25f), c(a.size());
  std::vector<double> rates;
  for (int i = 0; i < 6; ++i) {
    const auto start = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(),
                n, 0.0f, c.data(), n);
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - start;
    if (i > 0) rates.push_back(2.0 * n * n * n / dt.count() / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}
#endif

struct Config {
  std::vector<int64_t> w, r;
  Mode mode = Mode::kLongNet;
  bool causal = false;
  DType dtype = DType::kFloat32;
  // The problem: `batch` sequences of `seq_len` tokens.
  int64_t batch = 1, seq_len = 16384, heads = 8, dim = 64;
};

void RunAttention(benchmark::State& state, const Config& cfg) {
  attention::AttentionOptions options;
  options.segment_lengths = cfg.w;
  options.dilation_rates = cfg.r;
  options.mode = cfg.mode;
  options.causal = cfg.causal;
  const auto shape = attention::DenseShape(cfg.dtype, cfg.batch, cfg.seq_len, cfg.heads, cfg.dim);
  auto plan = attention::PlanAttention(options, shape);
  auto backend = attention::CreateCpuBackend({Threads(), "auto"});
  if (!plan.ok() || !backend.ok()) {
    state.SkipWithError("cannot plan or create the backend");
    return;
  }
  auto pool = memory::BufferPool::Create({"bench", size_t{8} << 30}, memory::NewHostAllocator());
  auto q = (*pool)->Acquire(plan->tensor_bytes);
  auto k = (*pool)->Acquire(plan->tensor_bytes);
  auto v = (*pool)->Acquire(plan->tensor_bytes);
  auto o = (*pool)->Acquire(plan->tensor_bytes);
  const size_t ws_bytes = (*backend)->WorkspaceBytes(*plan);
  auto ws = (*pool)->Acquire(ws_bytes > 0 ? ws_bytes : 1);
  for (auto* b : {&q, &k, &v}) FillRandom((*b)->data(), plan->tensor_bytes);
  const attention::AttentionTensors t{{q->data(), plan->tensor_bytes, DeviceLoc::Host()},
                                      {k->data(), plan->tensor_bytes, DeviceLoc::Host()},
                                      {v->data(), plan->tensor_bytes, DeviceLoc::Host()},
                                      {o->data(), plan->tensor_bytes, DeviceLoc::Host()}};
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    absl::Status s = (*backend)->Run(*plan, t, {ws->data(), ws->size(), DeviceLoc::Host()});
    if (!s.ok()) {
      state.SkipWithError(std::string(s.message()).c_str());
      return;
    }
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(plan->flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  if (g_sgemm_gflops > 0) {
    const double gflops = plan->flops / 1e9 * static_cast<double>(state.iterations()) /
                          elapsed.count();
    state.counters["of_sgemm"] = gflops / g_sgemm_gflops;
  }
  state.counters["threads"] = Threads();
  state.SetLabel(std::string((*backend)->name()));
}

// The multihead module's projection GEMM alone: (tokens, E) x (E, E), as one projection runs.
void BM_ProjectionGemm(benchmark::State& state) {
  const int64_t m = state.range(0), e = state.range(1);
  auto runner = attention::cpu::TileRunner::Create(Threads(), "auto");
  if (!runner.ok()) {
    state.SkipWithError("no thread pool");
    return;
  }
  std::vector<float> a(static_cast<size_t>(m * e)), b(static_cast<size_t>(e * e)), bias(e, 0.1f),
      c(a.size());
  FillRandom(a.data(), a.size() * sizeof(float));
  FillRandom(b.data(), b.size() * sizeof(float));
  const multihead::cpu::GemmBlockFn fn = multihead::cpu::GemmBlockFor((*runner)->isa());
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    multihead::cpu::Gemm({a.data(), e, b.data(), e, bias.data(), c.data(), e, m, e, e}, fn,
                         (*runner)->pool());
    benchmark::DoNotOptimize(c.data());
  }
  const double flops = 2.0 * static_cast<double>(m * e * e);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  if (g_sgemm_gflops > 0) {
    state.counters["of_sgemm"] =
        flops / 1e9 * static_cast<double>(state.iterations()) / elapsed.count() / g_sgemm_gflops;
  }
  state.counters["threads"] = Threads();
  state.SetLabel(std::string((*runner)->isa()));
}

// The whole multihead module (random weights, fp32): projections, attention, norm, projection.
void BM_Multihead(benchmark::State& state) {
  const int64_t n = 16384, heads = 8, dim = 64, e = heads * dim;
  auto w = std::make_shared<multihead::MultiheadWeights>();
  w->embed_dim = e;
  w->num_heads = heads;
  w->id = 1;
  for (auto* m : {&w->wt_q, &w->wt_k, &w->wt_v, &w->wt_out}) {
    m->resize(static_cast<size_t>(e * e));
    FillRandom(m->data(), m->size() * sizeof(float));
  }
  for (auto* b : {&w->b_q, &w->b_k, &w->b_v, &w->b_out}) b->assign(static_cast<size_t>(e), 0.1f);
  w->layer_norm = true;
  w->ln_weight.assign(static_cast<size_t>(e), 1.0f);
  w->ln_bias.assign(static_cast<size_t>(e), 0.0f);
  attention::AttentionOptions o;
  o.segment_lengths = {512, 1024, 2048, 4096, 8192};
  o.dilation_rates = {1, 2, 4, 8, 16};
  auto plan =
      multihead::PlanMultihead(w, o, attention::DenseShape(DType::kFloat32, 1, n, heads, dim));
  auto backend = multihead::CreateCpuMultiheadBackend({Threads(), "auto"});
  if (!plan.ok() || !backend.ok()) {
    state.SkipWithError("cannot plan or create the backend");
    return;
  }
  std::vector<float> x(static_cast<size_t>(n * e)), y(x.size());
  FillRandom(x.data(), x.size() * sizeof(float));
  std::vector<unsigned char> ws((*backend)->WorkspaceBytes(*plan) + 64);
  void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data()) + 63) / 64 * 64);
  for (auto _ : state) {
    absl::Status s =
        (*backend)->Run(*plan,
                        {{x.data(), plan->tensor_bytes, DeviceLoc::Host()},
                         {y.data(), plan->tensor_bytes, DeviceLoc::Host()}},
                        {aligned, (*backend)->WorkspaceBytes(*plan), DeviceLoc::Host()});
    if (!s.ok()) {
      state.SkipWithError(std::string(s.message()).c_str());
      return;
    }
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(plan->flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = Threads();
  state.SetLabel(std::string((*backend)->name()));
}

}  // namespace
}  // namespace dilattn

int main(int argc, char** argv) {
  using namespace dilattn;
  benchmark::Initialize(&argc, argv);
#if defined(DILATTN_HAVE_OPENBLAS)
  g_sgemm_gflops = MeasureSgemmGflops(2048);
  benchmark::RegisterBenchmark("sgemm/openblas", BM_OpenBlasSgemm)
      ->Arg(2048)->UseRealTime()->Unit(benchmark::kMillisecond);
#endif
  const std::vector<int64_t> w = {512, 1024, 2048, 4096, 8192};
  const std::vector<int64_t> r = {1, 2, 4, 8, 16};
  struct Named {
    std::string name;
    Config cfg;
  };
  std::vector<Named> configs = {
      {"longnet/5branches/fp32", {w, r}},
      {"longnet/5branches/causal/fp32", {w, r, Mode::kLongNet, true}},
      {"longnet/5branches/bf16", {w, r, Mode::kLongNet, false, DType::kBFloat16}},
      {"longnet/5branches/fp16", {w, r, Mode::kLongNet, false, DType::kFloat16}},
      {"head_groups/5branches/fp32", {w, r, Mode::kHeadGroups}},
      // What a server batches from small requests: 16 sequences of 64 tokens, H = 4, D = 32, the
      // default model's branches (every segment longer than the sequence, so w = 64).
      {"short/16x64_tokens/fp32",
       {{2048, 4096, 8192, 16384, 32768}, r, Mode::kLongNet, false, DType::kFloat32, 16, 64, 4, 32}},
  };
  for (size_t i = 0; i < w.size(); ++i) {
    configs.push_back({"branch/w" + std::to_string(w[i]) + "_r" + std::to_string(r[i]) + "/fp32",
                       {{w[i]}, {r[i]}}});
  }
  for (const Named& n : configs) {
    benchmark::RegisterBenchmark(("attention/" + n.name).c_str(),
                                 [cfg = n.cfg](benchmark::State& s) { RunAttention(s, cfg); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark("multihead/projection_gemm", BM_ProjectionGemm)
      ->Args({16384, 512})
      ->Args({4096, 1024})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("multihead/module/N16384_E512/fp32", BM_Multihead)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
