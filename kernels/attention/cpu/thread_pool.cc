#include "kernels/attention/cpu/thread_pool.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"

namespace dilattn::attention::cpu {
namespace {

// Polls done() for about kSpin; whether it became true. The caller then sleeps on the mutex.
template <class Done>
bool SpinWait(Done&& done) {
  constexpr auto kSpin = std::chrono::microseconds(20);
  const auto until = std::chrono::steady_clock::now() + kSpin;
  while (true) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    if (std::chrono::steady_clock::now() >= until) return done();
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<ThreadPool>> ThreadPool::Create(int num_threads) {
  if (num_threads < 1 || num_threads > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("thread count must be in [1, 4096], got ", num_threads));
  }
  return std::unique_ptr<ThreadPool>(new ThreadPool(num_threads));
}

ThreadPool::ThreadPool(int num_threads) : max_workers_(num_threads) {
  threads_.reserve(static_cast<size_t>(num_threads - 1));
  for (int w = 1; w < num_threads; ++w) threads_.emplace_back([this, w] { WorkerLoop(w); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void ThreadPool::Drain(int worker) {
  for (int64_t i = next_item_.fetch_add(1, std::memory_order_relaxed); i < job_count_;
       i = next_item_.fetch_add(1, std::memory_order_relaxed)) {
    (*job_)(i, worker);
  }
}

void ThreadPool::WorkerLoop(int worker) {
  uint64_t seen = 0;
  while (true) {
    SpinWait([&] { return generation_.load(std::memory_order_acquire) != seen; });
    {
      absl::MutexLock lock(&mu_);
      struct Wake {
        ThreadPool* pool;
        uint64_t seen;
        int worker;
      } wake{this, seen, worker};
      mu_.Await(absl::Condition(
          +[](Wake* w) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return w->pool->stop_ ||
                   (w->pool->generation_.load(std::memory_order_relaxed) != w->seen &&
                    w->worker < w->pool->active_workers_);
          },
          &wake));
      if (stop_) return;
      seen = generation_.load(std::memory_order_relaxed);
    }
    Drain(worker);
    absl::MutexLock lock(&mu_);
    busy_workers_.fetch_sub(1, std::memory_order_release);
  }
}

void ThreadPool::ParallelFor(int64_t count, absl::FunctionRef<void(int64_t, int)> fn) {
  if (count <= 0) return;
  const int active = static_cast<int>(std::min<int64_t>({size(), max_workers_, count}));
  if (active <= 1) {
    for (int64_t i = 0; i < count; ++i) fn(i, 0);
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    job_ = &fn;
    job_count_ = count;
    next_item_.store(0, std::memory_order_relaxed);
    active_workers_ = active;
    busy_workers_.store(active - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  Drain(0);
  SpinWait([&] { return busy_workers_.load(std::memory_order_acquire) == 0; });
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](std::atomic<int>* busy) { return busy->load(std::memory_order_relaxed) == 0; },
      &busy_workers_));
  job_ = nullptr;
}

ThreadPool::ScopedLimit::ScopedLimit(ThreadPool& pool, int workers)
    : pool_(pool), before_(pool.max_workers_) {
  pool_.max_workers_ = std::max(1, workers);
}

ThreadPool::ScopedLimit::~ScopedLimit() { pool_.max_workers_ = before_; }

}  // namespace dilattn::attention::cpu
