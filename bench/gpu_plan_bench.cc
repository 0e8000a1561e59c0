// Host time to plan the fused GPU kernel's tile list (BuildGpuTiles), the work a GPU server does
// on the engine thread the first time it sees a batch's shape, and a sequence-parallel split
// (PlanSequenceParallel: the tiles, their slices, the exchanged rows and where they land), which
// the runner does for every split run. CPU only.
//
//   build/bench/gpu_plan_bench [--benchmark_filter=...]

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "benchmark/benchmark.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"
#include "kernels/attention/sequence_parallel.h"

namespace dilattn {
namespace {

using attention::DType;
using attention::Mode;

// B = 1, H = 16, D = 64 and the default branches; `global` adds LongNet's whole-sequence branch
// (w = n, r = n / 2048).
absl::StatusOr<attention::AttentionPlan> Problem(Mode mode, bool causal, int64_t n, bool global) {
  attention::AttentionOptions o;
  o.mode = mode;
  o.causal = causal;
  o.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  o.dilation_rates = {1, 2, 4, 8, 16};
  if (global) {
    o.segment_lengths.push_back(n);
    o.dilation_rates.push_back(n / 2048);
  }
  return attention::PlanAttention(o, attention::DenseShape(DType::kBFloat16, 1, n, 16, 64));
}

void PlanTiles(benchmark::State& state, Mode mode, bool causal, int64_t n, bool global = false) {
  absl::StatusOr<attention::AttentionPlan> plan = Problem(mode, causal, n, global);
  if (!plan.ok()) {
    state.SkipWithError(plan.status().ToString().c_str());
    return;
  }
  std::vector<attention::GpuTile> tiles;
  for (auto _ : state) {
    const absl::Status s = attention::BuildGpuTiles(*plan, 128, &tiles);
    if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    benchmark::DoNotOptimize(tiles.data());
  }
  state.counters["tiles"] = static_cast<double>(tiles.size());
}

// The same problems split across `gpus`.
void PlanSplit(benchmark::State& state, bool global, int gpus, int64_t n) {
  absl::StatusOr<attention::AttentionPlan> plan = Problem(Mode::kLongNet, false, n, global);
  if (!plan.ok()) {
    state.SkipWithError(plan.status().ToString().c_str());
    return;
  }
  int64_t sent = 0;
  for (auto _ : state) {
    absl::StatusOr<attention::SequenceParallelPlan> sp =
        attention::PlanSequenceParallel(*plan, gpus, 128);
    if (!sp.ok()) {
      state.SkipWithError(sp.status().ToString().c_str());
      break;
    }
    sent = sp->max_send_rows;
    benchmark::DoNotOptimize(sp->slices.data());
  }
  state.counters["rows_sent"] = static_cast<double>(sent);
}

}  // namespace
}  // namespace dilattn

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  for (const auto mode : {dilattn::attention::Mode::kLongNet, dilattn::attention::Mode::kHeadGroups}) {
    for (const bool causal : {false, true}) {
      for (const int64_t n : {int64_t{131072}, int64_t{2097152}, int64_t{8388608}}) {
        const std::string name =
            absl::StrCat("plan/", dilattn::attention::ModeName(mode), causal ? "/causal" : "",
                         "/N=", n);
        benchmark::RegisterBenchmark(name.c_str(),
                                     [=](benchmark::State& s) {
                                       dilattn::PlanTiles(s, mode, causal, n);
                                     })
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  for (const int64_t n : {int64_t{2097152}, int64_t{8388608}}) {
    const std::string name = absl::StrCat("plan/longnet+global/N=", n);
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) {
      dilattn::PlanTiles(s, dilattn::attention::Mode::kLongNet, false, n, true);
    })->Unit(benchmark::kMillisecond);
  }
  for (const bool global : {false, true}) {
    for (const int64_t n : {int64_t{2097152}, int64_t{8388608}}) {
      const std::string name =
          absl::StrCat("split/longnet", global ? "+global" : "", "/gpus=2/N=", n);
      benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) {
        dilattn::PlanSplit(s, global, 2, n);
      })->Unit(benchmark::kMillisecond);
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
