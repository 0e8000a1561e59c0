#include "server/model.h"

#include "absl/time/clock.h"
#include "server/engine.h"
#include "server/metrics.h"

namespace dilattn::server {
namespace {

FailureReason ReasonFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kCancelled: return FailureReason::kCanceled;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded: return FailureReason::kRejected;
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kResourceExhausted: return FailureReason::kBackend;
    default: return FailureReason::kOther;
  }
}

}  // namespace

Model::Model(ModelSpec spec, Engine* engine, Metrics* metrics)
    : spec_(std::move(spec)),
      engine_(engine),
      stats_(metrics->ForModel(spec_.name, spec_.version)),
      scheduler_(std::make_unique<Scheduler>(this, spec_.batching, engine)) {}

void CompleteRequest(std::unique_ptr<InferenceRequest> request, const absl::Status& status,
                     const RequestTimings& timings) {
  const absl::Duration total = absl::Now() - request->arrival;
  if (request->model != nullptr) {
    ModelStats& stats = request->model->stats();
    if (status.ok()) {
      stats.RequestSucceeded(total, timings, request->batch);
    } else {
      stats.RequestFailed(total, ReasonFor(status.code()));
    }
  }
  if (request->done) request->done(*request, status, timings);
}

}  // namespace dilattn::server
