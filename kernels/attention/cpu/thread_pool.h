#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace dilattn::attention::cpu {

// A fixed set of workers for fork-join loops. The calling thread works too, as worker 0, so a
// pool of size 1 has no extra thread at all. Items are claimed one at a time from a shared
// counter, which balances items of uneven cost.
class ThreadPool {
 public:
  static absl::StatusOr<std::unique_ptr<ThreadPool>> Create(int num_threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  // Calls fn(item, worker) for every item in [0, count) and returns when all calls have. worker is
  // in [0, size()) and no two concurrent calls share one, so it can index per-worker scratch.
  // One ParallelFor at a time per pool (the engine thread that owns it).
  void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t, int)> fn);

  // Within its scope, ParallelFor uses at most `workers` of the pool's threads (the caller
  // counted, so 1 runs every item on the calling thread): waking a worker costs tens of
  // microseconds on a virtual machine, more than it saves on a small job. Owner thread only.
  class ScopedLimit {
   public:
    ScopedLimit(ThreadPool& pool, int workers);
    ~ScopedLimit();
    ScopedLimit(const ScopedLimit&) = delete;
    ScopedLimit& operator=(const ScopedLimit&) = delete;

   private:
    ThreadPool& pool_;
    const int before_;
  };

 private:
  explicit ThreadPool(int num_threads);
  void WorkerLoop(int worker);
  void Drain(int worker);

  absl::Mutex mu_;
  // Changed only under mu_, so that threads sleeping on it wake; atomic, so that threads watch
  // them for a few microseconds before they sleep (SpinWait): a job's fork-joins come back to
  // back, and a thread still watching starts on the next at once, where waking a sleeping one
  // costs a futex round trip.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> busy_workers_{0};
  // Workers [1, active_workers_) take part in the current generation; the others sleep through it.
  int active_workers_ ABSL_GUARDED_BY(mu_) = 0;
  int max_workers_ = 0;  // ScopedLimit's; set and read by the owner thread only
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // The current job; written under mu_ before generation_ is bumped, read by workers after they
  // observe the new generation under mu_.
  const absl::FunctionRef<void(int64_t, int)>* job_ = nullptr;
  int64_t job_count_ = 0;
  std::atomic<int64_t> next_item_{0};
  std::vector<std::thread> threads_;
};

}  // namespace dilattn::attention::cpu
