#include "server/model_registry.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/common/quote.h"

namespace dilattn::server {

absl::StatusOr<std::unique_ptr<ModelRegistry>> ModelRegistry::Create(
    std::vector<ModelSpec> specs, Engine* engine, Metrics* metrics) {
  std::set<std::string> names;
  for (const ModelSpec& s : specs) {
    if (!names.insert(s.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("model '", s.name, "' is defined twice"));
    }
  }
  auto registry = std::unique_ptr<ModelRegistry>(new ModelRegistry());
  for (ModelSpec& s : specs) {
    registry->models_.push_back(std::make_unique<Model>(std::move(s), engine, metrics));
  }
  return registry;
}

absl::StatusOr<Model*> ModelRegistry::Find(absl::string_view name,
                                           absl::string_view version) const {
  for (const auto& m : models_) {
    if (m->name() != name) continue;
    if (!version.empty() && version != m->spec().version) {
      return absl::NotFoundError(absl::StrCat("model ", Quote(name), " has no version ",
                                              Quote(version), " (served: '", m->spec().version,
                                              "')"));
    }
    return m.get();
  }
  std::vector<std::string> served;
  for (const auto& m : models_) served.push_back(m->name());
  return absl::NotFoundError(absl::StrCat("Request for unknown model: ", Quote(name),
                                          " is not found (served: ", absl::StrJoin(served, ", "),
                                          ")"));
}

void ModelRegistry::Flush() {
  for (auto& m : models_) m->scheduler().Flush();
}

void ModelRegistry::Shutdown() {
  for (auto& m : models_) m->scheduler().Shutdown();
}

}  // namespace dilattn::server
