#pragma once

// Per-model counters in two views: Triton's ModelStatistics (for the statistics RPC and
// perf_analyzer's server-side breakdown) and the Prometheus metrics. One call updates both.

#include <algorithm>
#include <cstdint>
#include <map>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "inference/grpc_service.pb.h"
#include "server/metrics.h"
#include "server/request.h"

namespace dilattn::server {

// Durations are differences of MonotonicNow() (kernels/common/clock.h), so none should be
// negative; the counters are unsigned, and this keeps one that is from wrapping a total.
inline absl::Duration NonNegative(absl::Duration d) { return std::max(d, absl::ZeroDuration()); }

class ModelStats {
 public:
  explicit ModelStats(ModelMetrics* metrics) : metrics_(metrics) {}

  void RequestSucceeded(absl::Duration total, const RequestTimings& t, int64_t inferences);
  void RequestFailed(absl::Duration total, FailureReason reason);
  void Executed(int64_t batch_size, absl::Duration compute_input, absl::Duration compute_infer,
                absl::Duration compute_output, ExecutionPath path);
  void AddPending(int64_t delta);

  void Fill(inference::ModelStatistics* out) const;

 private:
  struct Duration {
    uint64_t count = 0;
    uint64_t ns = 0;
    void Add(absl::Duration d) {
      ++count;
      ns += static_cast<uint64_t>(absl::ToInt64Nanoseconds(NonNegative(d)));
    }
  };
  struct BatchDurations {
    Duration compute_input, compute_infer, compute_output;
  };

  ModelMetrics* const metrics_;
  mutable absl::Mutex mu_;
  Duration success_ ABSL_GUARDED_BY(mu_);
  Duration fail_ ABSL_GUARDED_BY(mu_);
  Duration queue_ ABSL_GUARDED_BY(mu_);
  Duration compute_input_ ABSL_GUARDED_BY(mu_);
  Duration compute_infer_ ABSL_GUARDED_BY(mu_);
  Duration compute_output_ ABSL_GUARDED_BY(mu_);
  uint64_t inference_count_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t execution_count_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_inference_ms_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint64_t, BatchDurations> batches_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dilattn::server
