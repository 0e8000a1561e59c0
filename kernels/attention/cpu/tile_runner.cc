#include "kernels/attention/cpu/tile_runner.h"

#include <algorithm>
#include <atomic>
#include <thread>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "absl/strings/str_cat.h"

namespace dilattn::attention::cpu {
namespace {

// The ScopedStopCheck of this thread, if any.
thread_local const std::function<bool()>* current_stop_check = nullptr;

struct Isa {
  const char* name;
  TileFn (*kernel)();
  bool (*available)();
};

#if defined(__x86_64__)
// F16C from CPUID leaf 1 (ECX bit 29): clang before 16 has no "f16c" for __builtin_cpu_supports.
bool HasF16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}
bool HasAvx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && HasF16c();
}
bool HasAvx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && HasF16c();
}
#endif
bool Always() { return true; }

// Widest first: "auto" takes the first this CPU runs.
constexpr Isa kIsas[] = {
#if defined(__x86_64__)
    {"avx512", &Avx512TileKernel, &HasAvx512},
    {"avx2", &Avx2TileKernel, &HasAvx2},
#endif
    {"generic", &GenericTileKernel, &Always},
};

absl::StatusOr<const Isa*> FindIsa(const std::string& name) {
  for (const Isa& isa : kIsas) {
    if (name == "auto" ? isa.available() : name == isa.name) {
      if (!isa.available()) {
        return absl::FailedPreconditionError(
            absl::StrCat("CPU instruction set '", name, "' is not supported by this processor"));
      }
      return &isa;
    }
  }
  std::string known = "auto";
  for (const Isa& isa : kIsas) absl::StrAppend(&known, ", ", isa.name);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown CPU instruction set '", name, "' (known: ", known, ")"));
}

size_t AlignUp(size_t x) { return (x + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

}  // namespace

absl::StatusOr<std::unique_ptr<TileRunner>> TileRunner::Create(int threads,
                                                               const std::string& isa) {
  absl::StatusOr<const Isa*> found = FindIsa(isa);
  if (!found.ok()) return found.status();
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  absl::StatusOr<std::unique_ptr<ThreadPool>> pool = ThreadPool::Create(threads);
  if (!pool.ok()) return pool.status();
  return std::unique_ptr<TileRunner>(
      new TileRunner(*std::move(pool), (*found)->kernel(), (*found)->name));
}

size_t TileRunner::ScratchBytes(int head_dim) const {
  return AlignUp(TileScratchFloats(head_dim) * sizeof(float)) * static_cast<size_t>(workers());
}

void TileRunner::Run(const TileContext& ctx, std::vector<TileTask>& tasks, void* scratch) {
  const bool causal = ctx.params->causal;
  const KeySpan* spans = ctx.spans;
  auto cost = [&](const TileTask& t) {
    int64_t keys = 0;
    const int64_t q_last = t.q_first_row + (t.q_count - 1) * t.stride;
    for (int i = 0; i < t.span_count; ++i) {
      const KeySpan& s = spans[t.span_begin + i];
      if (!causal) {
        keys += s.count;
      } else if (s.first_row <= q_last) {
        keys += std::min<int64_t>((q_last - s.first_row) / t.stride + 1, s.count);
      }
    }
    return keys * t.q_count;
  };
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const TileTask& a, const TileTask& b) { return cost(a) > cost(b); });
  const size_t slice = AlignUp(TileScratchFloats(ctx.params->head_dim) * sizeof(float));
  std::byte* base = static_cast<std::byte*>(scratch);
  const std::function<bool()>* const check = current_stop_check;
  std::atomic<bool> stopped{false};
  pool_->ParallelFor(static_cast<int64_t>(tasks.size()), [&](int64_t i, int worker) {
    if (check != nullptr) {
      if (stopped.load(std::memory_order_relaxed)) return;
      if ((*check)()) {
        stopped.store(true, std::memory_order_relaxed);
        return;
      }
    }
    fn_(ctx, tasks[static_cast<size_t>(i)],
        reinterpret_cast<float*>(base + slice * static_cast<size_t>(worker)));
  });
}

ScopedStopCheck::ScopedStopCheck(std::function<bool()> stopped)
    : stopped_(std::move(stopped)), outer_(current_stop_check) {
  current_stop_check = &stopped_;
}

ScopedStopCheck::~ScopedStopCheck() { current_stop_check = outer_; }

}  // namespace dilattn::attention::cpu
