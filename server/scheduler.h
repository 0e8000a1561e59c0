#pragma once

// The dynamic batcher of one model. Requests wait in one FIFO per priority level; a batcher
// thread forms batches of requests that share a batch key (same operator options, dtype, H and
// D; sequence lengths may differ, they are packed without padding), within max_batch_size
// sequences and max_batch_tokens tokens, waiting up to max_queue_delay for a preferred size.
// Without dynamic batching each request runs alone.
// Expired and cancelled requests leave the queue without ever being computed.

#include <cstdint>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/model_config.h"
#include "server/request.h"

namespace dilattn::server {

class Engine;
class Model;

class Scheduler {
 public:
  Scheduler(Model* model, const BatchingPolicy& policy, Engine* engine);
  ~Scheduler();

  // Takes the request. A rejection (queue full: UNAVAILABLE as Triton answers; shutting down)
  // completes it at once.
  void Enqueue(std::unique_ptr<InferenceRequest> request);

  // From now on batches form without waiting for a preferred size or the queue delay; requests
  // are still taken (the server's first step on SIGTERM: in-flight streams keep sending).
  void Flush();

  // Stops taking requests, dispatches every queued one without further delay, joins the thread.
  void Shutdown();

  size_t queued() const;

 private:
  // How far the batch headed by `head` reaches in the queues now, and from when it may run:
  // at once when full, at a preferred size, flushing or stopping; else at the head's queue delay.
  struct Extent {
    int64_t sequences = 0;
    absl::Time ready_at;
  };

  void Loop();
  // Waits, holding no engine slot, until the head's batch may run (true) or the queues are empty
  // and the scheduler is stopping (false); completes expired and cancelled requests meanwhile.
  bool AwaitReadyBatch();
  Extent ExtentLocked(const InferenceRequest& head) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Removes expired and cancelled requests into `dropped`; returns the earliest deadline left.
  absl::Time SweepLocked(std::vector<std::unique_ptr<InferenceRequest>>* dropped)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  InferenceRequest* HeadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Completes swept requests: CANCELLED or DEADLINE_EXCEEDED, never computed.
  void FinishDropped(std::vector<std::unique_ptr<InferenceRequest>>& dropped);

  Model* const model_;
  const BatchingPolicy policy_;
  Engine* const engine_;

  mutable absl::Mutex mu_;
  absl::CondVar arrived_;
  std::vector<std::deque<std::unique_ptr<InferenceRequest>>> queues_ ABSL_GUARDED_BY(mu_);
  size_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool flushing_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace dilattn::server
