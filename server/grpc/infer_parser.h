#pragma once

// Turns a KServe ModelInferRequest into an InferenceRequest, checking everything before any
// allocation: model and version, the three inputs (names, datatypes, shapes, byte counts with
// overflow checks), requested outputs, and parameters (operator overrides, priority, timeout).
// Every problem is INVALID_ARGUMENT (NOT_FOUND for an unknown model) with a message naming it.

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "inference/grpc_service.pb.h"
#include "server/grpc/wire.h"
#include "server/model_registry.h"
#include "server/request.h"
#include "server/shared_memory.h"

namespace dilattn::server {

// `request` is the message without its raw tensors, which `raw` holds; they are copied once, into
// a lease from `staging` (or the heap when it is full): large ones in the background, the request
// carrying the copy's progress (InferenceRequest::fill), so that executors wait for what they
// read. Tensors that the request places in registered shared memory are viewed there, without a
// copy. `response` receives the header (model, version, id, output metadata); the engine's output
// lease is appended when the request completes. A request that names a served model and fails
// to parse counts as a failure of that model (CountRefusedRequest).
absl::StatusOr<std::unique_ptr<InferenceRequest>> ParseInferRequest(
    const inference::ModelInferRequest& request, const RequestBytes& raw,
    const ModelRegistry& registry, const SharedMemoryManager& shared_memory, absl::Time arrival,
    absl::Time rpc_deadline,
    inference::ModelInferResponse* response);

const char* DatatypeName(attention::DType dtype);

// "[1,4096,8,64]", for messages.
std::string ShapeText(const google::protobuf::RepeatedField<int64_t>& shape);

// The priority level a request asking for `requested` gets.
int PriorityLevel(const ModelSpec& spec, uint64_t requested);

// How long a request asking for a timeout of `requested_us` microseconds (Triton's `timeout`; 0:
// none given; the caller refuses negative values) may wait to start computing, by Triton's
// rules: its own where the model allows overriding its default timeout, else the model's
// default; InfiniteDuration where neither applies. Its deadline is the earlier of its arrival
// plus this and its RPC's deadline. Every API's requests (KServe's and each stretch of a native
// stream) get theirs here, so that they expire alike.
absl::Duration RequestTimeout(const ModelSpec& spec, int64_t requested_us);

// A [B, N, H, D] shape (4 dims) against the model: every dim >= 1, and N, H, D as the model fixes
// them. `what` names the shape's owner in messages ("input 'Q'").
absl::Status CheckDims(const ModelSpec& spec, const google::protobuf::RepeatedField<int64_t>& shape,
                       absl::string_view what);

// A [B, N, E] shape of hidden states against a multihead model: every dim >= 1, N as the model
// fixes it, E its weights' embed dim.
absl::Status CheckHiddenDims(const ModelSpec& spec,
                             const google::protobuf::RepeatedField<int64_t>& shape,
                             absl::string_view what);

// Requests with equal keys (operator, datatype, heads, head dim) may share one execution; their
// sequence lengths may differ.
std::string BatchKey(const InferenceRequest& r);

}  // namespace dilattn::server
