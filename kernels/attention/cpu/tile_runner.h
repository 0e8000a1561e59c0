#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/attention/cpu/thread_pool.h"
#include "kernels/attention/cpu/tile_kernel.h"

namespace dilattn::attention::cpu {

// The CPU backends' shared engine room: the tile kernel for the widest instruction set this
// processor runs (or the one asked for), a thread pool, and per-worker scratch management.
class TileRunner {
 public:
  // isa: "auto", "avx512", "avx2" or "generic". threads: 0 for one per hardware thread.
  static absl::StatusOr<std::unique_ptr<TileRunner>> Create(int threads, const std::string& isa);

  absl::string_view isa() const { return isa_; }
  int workers() const { return pool_->size(); }
  ThreadPool& pool() { return *pool_; }

  // Bytes of scratch Run() needs for this head dim: one slice per worker.
  size_t ScratchBytes(int head_dim) const;

  // Runs every task, costliest first so the last to finish are short. `scratch` holds
  // ScratchBytes(head_dim) bytes, 64-byte aligned.
  void Run(const TileContext& ctx, std::vector<TileTask>& tasks, void* scratch);

 private:
  TileRunner(std::unique_ptr<ThreadPool> pool, TileFn fn, const char* isa)
      : pool_(std::move(pool)), fn_(fn), isa_(isa) {}

  std::unique_ptr<ThreadPool> pool_;
  TileFn fn_;
  const char* isa_;
};

inline constexpr size_t kScratchAlign = 64;

// While one lives on a thread, TileRunner::Run called on that thread starts no more tasks once
// `stopped` returns true (asked before each task, from the workers' threads; tasks already
// running finish), leaving the output unfinished: an executor whose job's requests were all
// cancelled stops computing it. The caller tells a stopped run by asking `stopped` again.
class ScopedStopCheck {
 public:
  explicit ScopedStopCheck(std::function<bool()> stopped);
  ~ScopedStopCheck();
  ScopedStopCheck(const ScopedStopCheck&) = delete;
  ScopedStopCheck& operator=(const ScopedStopCheck&) = delete;

 private:
  std::function<bool()> stopped_;
  const std::function<bool()>* outer_;
};

}  // namespace dilattn::attention::cpu
