#include "server/model.h"

#include "kernels/common/clock.h"
#include "server/engine.h"
#include "server/metrics.h"

namespace dilattn::server {

FailureReason FailureReasonFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kCancelled: return FailureReason::kCanceled;
    // Turned away for want of capacity or time: a deadline passed in the queue, shutting down,
    // or memory (a pool ran out, or one request is larger than a pool's cap). Operators act on
    // these with replicas or caps, not as faults.
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kResourceExhausted:
      return FailureReason::kRejected;
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kDataLoss:
      return FailureReason::kBackend;
    default: return FailureReason::kOther;
  }
}

void CountRefusedRequest(Model* model, absl::Time arrival, const absl::Status& status) {
  if (model != nullptr && !status.ok()) {
    model->stats().RequestFailed(MonotonicNow() - arrival, FailureReasonFor(status.code()));
  }
}

Model::Model(ModelSpec spec, Engine* engine, Metrics* metrics)
    : spec_(std::move(spec)),
      engine_(engine),
      stats_(metrics->ForModel(spec_.name, spec_.version)),
      scheduler_(std::make_unique<Scheduler>(this, spec_.batching, engine)) {}

void CompleteRequest(std::unique_ptr<InferenceRequest> request, const absl::Status& status,
                     const RequestTimings& timings) {
  const absl::Duration total = MonotonicNow() - request->arrival;
  if (request->model != nullptr) {
    ModelStats& stats = request->model->stats();
    if (status.ok()) {
      stats.RequestSucceeded(total, timings, request->batch);
    } else {
      stats.RequestFailed(total, FailureReasonFor(status.code()));
    }
  }
  if (request->done) request->done(*request, status, timings);
}

}  // namespace dilattn::server
