#pragma once

#include <memory>
#include <string>

#include "server/model_config.h"
#include "server/model_stats.h"
#include "server/request.h"
#include "server/scheduler.h"

namespace dilattn::server {

class Engine;
class Metrics;

// A served model: its configuration, its scheduler and its statistics.
class Model {
 public:
  Model(ModelSpec spec, Engine* engine, Metrics* metrics);

  const ModelSpec& spec() const { return spec_; }
  const std::string& name() const { return spec_.name; }
  ModelStats& stats() { return stats_; }
  Scheduler& scheduler() { return *scheduler_; }
  Engine& engine() { return *engine_; }

 private:
  ModelSpec spec_;
  Engine* engine_;
  ModelStats stats_;
  std::unique_ptr<Scheduler> scheduler_;
};

// Triton's failure reason for a request that ended with `code`.
FailureReason FailureReasonFor(absl::StatusCode code);

// Counts a request of `model` that failed before it could be queued (it did not parse, or its
// stream's header was refused), so that the failure metrics see every request the model was
// named in. Nothing for a null model or an OK status.
void CountRefusedRequest(Model* model, absl::Time arrival, const absl::Status& status);

// Records the outcome in the model's statistics and runs the request's completion.
void CompleteRequest(std::unique_ptr<InferenceRequest> request, const absl::Status& status,
                     const RequestTimings& timings = {});

}  // namespace dilattn::server
