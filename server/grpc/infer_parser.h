#pragma once

// Turns a KServe ModelInferRequest into an InferenceRequest, checking everything before any
// allocation: model and version, the three inputs (names, datatypes, shapes, byte counts with
// overflow checks), requested outputs, and parameters (operator overrides, priority, timeout).
// Every problem is INVALID_ARGUMENT (NOT_FOUND for an unknown model) with a message naming it.

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "inference/grpc_service.pb.h"
#include "server/model_registry.h"
#include "server/request.h"

namespace dilattn::server {

// `response` receives the header (model, version, id, output metadata) and an empty raw output
// that the engine fills; both it and `request` must outlive the returned request's completion.
absl::StatusOr<std::unique_ptr<InferenceRequest>> ParseInferRequest(
    const inference::ModelInferRequest& request, const ModelRegistry& registry,
    absl::Time arrival, absl::Time rpc_deadline, inference::ModelInferResponse* response);

const char* DatatypeName(attention::DType dtype);

}  // namespace dilattn::server
