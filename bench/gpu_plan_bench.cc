// Host time to plan the fused GPU kernel's tile list (BuildGpuTiles), the work a GPU server does
// on the engine thread the first time it sees a batch's shape. CPU only.
//
//   build/bench/gpu_plan_bench [--benchmark_filter=...]

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "benchmark/benchmark.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"

namespace dilattn {
namespace {

using attention::DType;
using attention::Mode;

void PlanTiles(benchmark::State& state, Mode mode, bool causal, int64_t n) {
  attention::AttentionOptions o;
  o.mode = mode;
  o.causal = causal;
  o.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  o.dilation_rates = {1, 2, 4, 8, 16};
  absl::StatusOr<attention::AttentionPlan> plan =
      attention::PlanAttention(o, attention::DenseShape(DType::kBFloat16, 1, n, 16, 64));
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
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
