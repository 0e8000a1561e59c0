#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/model.h"

namespace dilattn::server {

class ModelRegistry {
 public:
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Create(std::vector<ModelSpec> specs,
                                                               Engine* engine, Metrics* metrics);

  // NOT_FOUND naming the model (and the served ones) or the version.
  absl::StatusOr<Model*> Find(absl::string_view name, absl::string_view version) const;
  const std::vector<std::unique_ptr<Model>>& models() const { return models_; }

  // Every scheduler dispatches without batching delays from now on (Scheduler::Flush).
  void Flush();
  // Stops every scheduler after it has dispatched what it holds.
  void Shutdown();

 private:
  std::vector<std::unique_ptr<Model>> models_;
};

}  // namespace dilattn::server
