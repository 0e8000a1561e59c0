#include "server/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/block_sparse/block_sparse.h"
#include "kernels/common/clock.h"
#include "server/engine.h"
#include "server/model.h"

namespace dilattn::server {
namespace {

// How often a batcher waiting for the engine looks at its queue for expired requests.
constexpr absl::Duration kSweepInterval = absl::Milliseconds(5);

}  // namespace

Scheduler::Scheduler(Model* model, const BatchingPolicy& policy, Engine* engine)
    : model_(model), policy_(policy), engine_(engine) {
  queues_.resize(static_cast<size_t>(std::max(1, policy_.priority_levels)));
  thread_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() { Shutdown(); }

size_t Scheduler::queued() const {
  absl::MutexLock lock(&mu_);
  return queued_;
}

void Scheduler::Enqueue(std::unique_ptr<InferenceRequest> request) {
  absl::Status rejection;
  std::vector<std::unique_ptr<InferenceRequest>> dropped;
  {
    absl::MutexLock lock(&mu_);
    auto full = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return policy_.max_queue_size > 0 && queued_ >= policy_.max_queue_size;
    };
    if (!stopping_ && full()) {
      // Cancelled and expired requests hold no place: the batcher drops them only when it next
      // wakes, and a request arriving before that must not be refused for them.
      SweepLocked(&dropped);
      if (!dropped.empty()) arrived_.Signal();  // the batcher's head may be gone
    }
    if (stopping_) {
      rejection = absl::UnavailableError("server is shutting down");
    } else if (full()) {
      rejection = absl::UnavailableError("Exceeds maximum queue size");
    } else {
      const int level = std::clamp(request->priority, 1, policy_.priority_levels);
      request->enqueued = MonotonicNow();
      queues_[static_cast<size_t>(level - 1)].push_back(std::move(request));
      ++queued_;
      // The gauge moves under mu_ with the queue, so a scrape reads the queue as it is.
      model_->stats().AddPending(1);
      arrived_.Signal();
    }
  }
  FinishDropped(dropped);
  if (!rejection.ok()) CompleteRequest(std::move(request), rejection);
}

void Scheduler::Flush() {
  absl::MutexLock lock(&mu_);
  flushing_ = true;
  arrived_.SignalAll();
}

void Scheduler::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    arrived_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
}

InferenceRequest* Scheduler::HeadLocked() {
  for (auto& q : queues_) {
    if (!q.empty()) return q.front().get();
  }
  return nullptr;
}

absl::Time Scheduler::SweepLocked(std::vector<std::unique_ptr<InferenceRequest>>* dropped) {
  const absl::Time now = MonotonicNow();
  absl::Time earliest = absl::InfiniteFuture();
  for (auto& q : queues_) {
    for (auto it = q.begin(); it != q.end();) {
      InferenceRequest& r = **it;
      if (r.cancelled->load() || r.deadline <= now) {
        dropped->push_back(std::move(*it));
        it = q.erase(it);
        --queued_;
        model_->stats().AddPending(-1);
      } else {
        earliest = std::min(earliest, r.deadline);
        ++it;
      }
    }
  }
  return earliest;
}

void Scheduler::FinishDropped(std::vector<std::unique_ptr<InferenceRequest>>& dropped) {
  for (auto& r : dropped) {
    const bool cancelled = r->cancelled->load();
    CompleteRequest(std::move(r),
                    cancelled ? absl::CancelledError("request cancelled; it was not computed")
                              : absl::DeadlineExceededError(
                                    "request timeout expired before execution; it was not "
                                    "computed"));
  }
  dropped.clear();
}

Scheduler::Extent Scheduler::ExtentLocked(const InferenceRequest& head) const {
  // The queues in service order, taking the requests that share the head's key.
  Extent e;
  int64_t tokens = 0;
  int64_t kept_pairs = 0;
  bool limited = false;
  for (const auto& q : queues_) {
    for (const auto& r : q) {
      if (r->batch_key != head.batch_key) continue;
      // Each request was checked alone; the batch must not exceed what each fits within, or a
      // request accepted alone would fail for what it was batched with.
      if (e.sequences > 0 && (!policy_.dynamic || policy_.max_batch_size == 0 ||
                              e.sequences + r->batch > policy_.max_batch_size ||
                              tokens + r->tokens() > policy_.max_batch_tokens ||
                              kept_pairs + r->kept_pairs > block_sparse::kMaxKeptPairs)) {
        limited = true;
        break;
      }
      e.sequences += r->batch;
      tokens += r->tokens();
      kept_pairs += r->kept_pairs;
    }
    if (limited) break;
  }
  const bool at_max = limited || !policy_.dynamic || policy_.max_batch_size == 0 ||
                      e.sequences >= policy_.max_batch_size;
  const bool preferred =
      !policy_.preferred_batch_sizes.empty() && e.sequences >= policy_.preferred_batch_sizes.back();
  e.ready_at = at_max || preferred || stopping_ || flushing_
                   ? absl::InfinitePast()
                   : head.enqueued + policy_.max_queue_delay;
  return e;
}

bool Scheduler::AwaitReadyBatch() {
  std::vector<std::unique_ptr<InferenceRequest>> dropped;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      while (true) {
        const absl::Time earliest_deadline = SweepLocked(&dropped);
        if (!dropped.empty()) break;  // completed outside the lock, then look again
        InferenceRequest* head = HeadLocked();
        if (head == nullptr) {
          if (stopping_) return false;
          arrived_.Wait(&mu_);
          continue;
        }
        const absl::Time ready_at = ExtentLocked(*head).ready_at;
        if (MonotonicNow() >= ready_at) return true;
        WaitUntil(arrived_, &mu_, std::min(ready_at, earliest_deadline));
      }
    }
    FinishDropped(dropped);
  }
}

void Scheduler::Loop() {
  while (true) {
    // A batch that waits for a preferred size or its queue delay waits without an engine slot,
    // so that other models' batches run meanwhile (one device has one slot).
    if (!AwaitReadyBatch()) return;
    // Form the batch only once the engine can take it, so that requests arriving meanwhile join.
    // While waiting, keep rejecting requests whose time runs out.
    bool have_slot = false;
    while (!have_slot) {
      have_slot = engine_->AcquireSlot(MonotonicNow() + kSweepInterval);
      std::vector<std::unique_ptr<InferenceRequest>> dropped;
      bool empty;
      {
        absl::MutexLock lock(&mu_);
        SweepLocked(&dropped);
        empty = queued_ == 0;
      }
      FinishDropped(dropped);
      if (empty) {
        if (have_slot) engine_->ReleaseSlot();
        have_slot = false;
        break;
      }
    }
    if (!have_slot) continue;

    Batch batch;
    batch.model = model_;
    std::vector<std::unique_ptr<InferenceRequest>> dropped;
    {
      absl::MutexLock lock(&mu_);
      SweepLocked(&dropped);
      InferenceRequest* head = HeadLocked();
      // The head may have changed while the slot was awaited (the ready one expired or was
      // cancelled); a new head that is not ready yet waits again, without the slot.
      if (head != nullptr) {
        const Extent e = ExtentLocked(*head);
        if (MonotonicNow() >= e.ready_at) {
          // The same walk as ExtentLocked, now moving the requests out.
          const std::string key = head->batch_key;
          int64_t taken = 0;
          for (auto& q : queues_) {
            for (auto it = q.begin(); it != q.end() && taken < e.sequences;) {
              if ((*it)->batch_key != key) {
                ++it;
                continue;
              }
              taken += (*it)->batch;
              batch.requests.push_back(std::move(*it));
              it = q.erase(it);
              --queued_;
            }
          }
          model_->stats().AddPending(-static_cast<int64_t>(batch.requests.size()));
        }
      }
    }
    FinishDropped(dropped);
    if (batch.requests.empty()) {
      engine_->ReleaseSlot();
      continue;
    }
    engine_->Submit(std::move(batch));
  }
}

}  // namespace dilattn::server
