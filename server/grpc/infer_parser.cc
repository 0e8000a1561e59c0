#include "server/grpc/infer_parser.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/common/quote.h"
#include "server/engine.h"
#include "server/model.h"

namespace dilattn::server {
namespace {

// Raw contents from this size on are copied in the background (InputFill), on a thread per
// kCopyBytesPerThread up to kMaxCopyThreads (grpc/wire.h).
constexpr size_t kBackgroundCopyMinBytes = size_t{4} << 20;

using inference::ModelInferRequest;

absl::Status Invalid(absl::string_view message) {
  return absl::InvalidArgumentError(message);
}

absl::StatusOr<ParamValue> ToParamValue(const inference::InferParameter& p) {
  switch (p.parameter_choice_case()) {
    case inference::InferParameter::kBoolParam: return ParamValue(p.bool_param());
    case inference::InferParameter::kInt64Param: return ParamValue(p.int64_param());
    case inference::InferParameter::kUint64Param: return ParamValue(p.uint64_param());
    case inference::InferParameter::kDoubleParam: return ParamValue(p.double_param());
    case inference::InferParameter::kStringParam: return ParamValue(p.string_param());
    default: return absl::InvalidArgumentError("parameter has no value");
  }
}

// A tensor's place in shared memory, from Triton's shared_memory_* tensor parameters.
struct SharedRef {
  bool set = false;
  std::string region;
  int64_t byte_size = -1;
  int64_t offset = 0;
};

absl::StatusOr<int64_t> NonNegative(const inference::InferParameter& p, absl::string_view what) {
  if (p.parameter_choice_case() == inference::InferParameter::kInt64Param &&
      p.int64_param() >= 0) {
    return p.int64_param();
  }
  if (p.parameter_choice_case() == inference::InferParameter::kUint64Param &&
      p.uint64_param() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return static_cast<int64_t>(p.uint64_param());
  }
  return Invalid(absl::StrCat(what, " must be a non-negative integer"));
}

// `what` is "input 'Q'" or "output 'O'"; `framing` the one other key the HTTP-minded clients
// send there, which means nothing on gRPC.
absl::StatusOr<SharedRef> TensorParameters(
    const google::protobuf::Map<std::string, inference::InferParameter>& params,
    absl::string_view what, absl::string_view framing) {
  SharedRef ref;
  bool size_given = false, offset_given = false;
  for (const auto& [key, value] : params) {
    if (key == framing) continue;
    if (key == "shared_memory_region") {
      if (value.parameter_choice_case() != inference::InferParameter::kStringParam) {
        return Invalid(absl::StrCat(what, " parameter 'shared_memory_region' must be a string"));
      }
      ref.set = true;
      ref.region = value.string_param();
    } else if (key == "shared_memory_byte_size") {
      absl::StatusOr<int64_t> v =
          NonNegative(value, absl::StrCat(what, " parameter 'shared_memory_byte_size'"));
      if (!v.ok()) return v.status();
      ref.byte_size = *v;
      size_given = true;
    } else if (key == "shared_memory_offset") {
      absl::StatusOr<int64_t> v =
          NonNegative(value, absl::StrCat(what, " parameter 'shared_memory_offset'"));
      if (!v.ok()) return v.status();
      ref.offset = *v;
      offset_given = true;
    } else {
      return Invalid(absl::StrCat(what, " parameter ", Quote(key), " is not supported"));
    }
  }
  if (!ref.set && (size_given || offset_given)) {
    return Invalid(absl::StrCat(what, " gives shared_memory_byte_size or shared_memory_offset "
                                      "without shared_memory_region"));
  }
  if (ref.set && !size_given) {
    return Invalid(absl::StrCat(what, " names shared_memory_region ", Quote(ref.region),
                                " without shared_memory_byte_size"));
  }
  return ref;
}

}  // namespace

const char* DatatypeName(attention::DType dtype) {
  switch (dtype) {
    case attention::DType::kFloat32: return "FP32";
    case attention::DType::kFloat16: return "FP16";
    case attention::DType::kBFloat16: return "BF16";
  }
  return "INVALID";
}

std::string ShapeText(const google::protobuf::RepeatedField<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

int PriorityLevel(const ModelSpec& spec, uint64_t requested) {
  // As Triton: 0 or a level beyond the model's means the default level.
  return requested >= 1 && requested <= static_cast<uint64_t>(spec.batching.priority_levels)
             ? static_cast<int>(requested)
             : spec.batching.default_priority;
}

absl::Duration RequestTimeout(const ModelSpec& spec, int64_t requested_us) {
  // As Triton: a model that sets a default timeout and does not allow overriding it ignores the
  // request's (model_config.cc allows overrides wherever there is no default).
  if (spec.batching.allow_timeout_override && requested_us > 0) {
    return absl::Microseconds(requested_us);
  }
  return spec.batching.default_timeout > absl::ZeroDuration() ? spec.batching.default_timeout
                                                              : absl::InfiniteDuration();
}

absl::Status CheckHiddenDims(const ModelSpec& spec,
                             const google::protobuf::RepeatedField<int64_t>& shape,
                             absl::string_view what) {
  static constexpr const char* kDims[3] = {"B", "N", "E"};
  const int64_t e = spec.dims[1] * spec.dims[2];
  for (int d = 0; d < 3; ++d) {
    if (shape[d] < 1) {
      return Invalid(absl::StrCat(what, " dim ", kDims[d], "=", shape[d], " in shape ",
                                  ShapeText(shape), " must be >= 1"));
    }
  }
  if (spec.dims[0] != -1 && shape[1] != spec.dims[0]) {
    return Invalid(absl::StrCat(what, " dim N=", shape[1], " but model '", spec.name, "' requires ",
                                spec.dims[0]));
  }
  if (shape[2] != e) {
    return Invalid(absl::StrCat(what, " dim E=", shape[2], " but model '", spec.name,
                                "' has embed dim ", e, " (", spec.dims[1], " heads of ",
                                spec.dims[2], ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckDims(const ModelSpec& spec, const google::protobuf::RepeatedField<int64_t>& shape,
                       absl::string_view what) {
  static constexpr const char* kDims[4] = {"B", "N", "H", "D"};
  for (int d = 0; d < 4; ++d) {
    if (shape[d] < 1) {
      return Invalid(absl::StrCat(what, " dim ", kDims[d], "=", shape[d], " in shape ",
                                  ShapeText(shape), " must be >= 1"));
    }
    if (d > 0 && spec.dims[static_cast<size_t>(d - 1)] != -1 &&
        shape[d] != spec.dims[static_cast<size_t>(d - 1)]) {
      return Invalid(absl::StrCat(what, " dim ", kDims[d], "=", shape[d], " but model '",
                                  spec.name, "' requires ",
                                  spec.dims[static_cast<size_t>(d - 1)]));
    }
  }
  return absl::OkStatus();
}

std::string BatchKey(const InferenceRequest& r) {
  return absl::StrCat(OperatorKey(r.options), "|", DatatypeName(r.dtype), "|", r.heads, "|",
                      r.head_dim);
}

namespace {

absl::StatusOr<std::unique_ptr<InferenceRequest>> ParseForModel(
    Model* model, const ModelInferRequest& req, const RequestBytes& raw,
    const SharedMemoryManager& shared_memory, absl::Time arrival, absl::Time rpc_deadline,
    inference::ModelInferResponse* response) {
  const ModelSpec& spec = model->spec();
  auto r = std::make_unique<InferenceRequest>();
  r->model = model;
  r->id = req.id();
  r->arrival = arrival;
  r->options = spec.defaults;
  r->priority = spec.batching.default_priority;

  // Inputs: exactly the model's (Q, K and V, or X), one datatype, one shape: [B, N, H, D], or
  // [B, N, E] for hidden states.
  const ModelInferRequest::InferInputTensor* by_name[3] = {nullptr, nullptr, nullptr};
  SharedRef shared[3];
  // raw_input_contents hold the inputs that are not in shared memory, in input order.
  int raw_index_of[3] = {-1, -1, -1};
  int raw_inputs = 0;
  const std::vector<std::string> kNames = spec.input_names();
  const int inputs = static_cast<int>(kNames.size());
  const bool hidden = spec.hidden_states();
  const std::string input_list = spec.InputList();
  for (int i = 0; i < req.inputs_size(); ++i) {
    const auto& in = req.inputs(i);
    const auto slot = std::find(kNames.begin(), kNames.end(), in.name());
    if (slot == kNames.end()) {
      return Invalid(absl::StrCat("unexpected input ", Quote(in.name()), " for model '", spec.name,
                                  "': ", inputs == 1 ? "its input is " : "inputs are ",
                                  input_list));
    }
    const int at = static_cast<int>(slot - kNames.begin());
    if (by_name[at] != nullptr) {
      return Invalid(absl::StrCat("input ", Quote(in.name()), " given twice"));
    }
    by_name[at] = &in;
    absl::StatusOr<SharedRef> ref = TensorParameters(
        in.parameters(), absl::StrCat("input ", Quote(in.name())), "binary_data_size");
    if (!ref.ok()) return ref.status();
    shared[at] = *std::move(ref);
    if (!shared[at].set) raw_index_of[at] = raw_inputs++;
  }
  for (int i = 0; i < inputs; ++i) {
    if (by_name[i] == nullptr) {
      return Invalid(absl::StrCat("missing input '", kNames[i], "' for model '", spec.name, "': ",
                                  inputs == 1 ? "its input is " : "inputs are ", input_list));
    }
  }
  const std::string first_name = Quote(kNames[0]);
  absl::StatusOr<attention::DType> dtype = attention::ParseDType(by_name[0]->datatype());
  if (!dtype.ok() || by_name[0]->datatype() != DatatypeName(*dtype)) {
    return Invalid(absl::StrCat("input ", first_name, " has datatype ",
                                Quote(by_name[0]->datatype()), "; supported: FP32, FP16, BF16"));
  }
  r->dtype = *dtype;
  const auto& shape = by_name[0]->shape();
  const int rank = hidden ? 3 : 4;
  for (int i = 0; i < inputs; ++i) {
    if (by_name[i]->datatype() != by_name[0]->datatype()) {
      return Invalid(absl::StrCat("input '", kNames[i], "' has datatype ",
                                  Quote(by_name[i]->datatype()), " but ", first_name, " has ",
                                  Quote(by_name[0]->datatype()), "; ", input_list,
                                  " must share one datatype"));
    }
    if (by_name[i]->shape_size() != rank) {
      return Invalid(absl::StrCat("input '", kNames[i], "' has shape ",
                                  ShapeText(by_name[i]->shape()), "; expected ",
                                  hidden ? "[B, N, E]" : "[B, N, H, D]"));
    }
    if (!std::equal(shape.begin(), shape.end(), by_name[i]->shape().begin(),
                    by_name[i]->shape().end())) {
      return Invalid(absl::StrCat("input '", kNames[i], "' has shape ",
                                  ShapeText(by_name[i]->shape()), " but ", first_name, " has ",
                                  ShapeText(shape), "; ", input_list, " must have one shape"));
    }
  }
  if (hidden) {
    if (absl::Status s = CheckHiddenDims(spec, shape, absl::StrCat("input ", first_name));
        !s.ok()) {
      return s;
    }
    r->heads = spec.dims[1];
    r->head_dim = spec.dims[2];
  } else {
    if (absl::Status s = CheckDims(spec, shape, "input 'Q'"); !s.ok()) return s;
    r->heads = shape[2];
    r->head_dim = shape[3];
  }
  r->batch = shape[0];
  r->seq_len = shape[1];
  if (spec.batching.max_batch_size > 0 && r->batch > spec.batching.max_batch_size) {
    return Invalid(absl::StrCat("batch size B=", r->batch, " exceeds max_batch_size ",
                                spec.batching.max_batch_size, " of model '", spec.name, "'"));
  }
  int64_t bytes = static_cast<int64_t>(attention::DTypeSize(r->dtype));
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(bytes, dim, &bytes)) {
      return Invalid(absl::StrCat("shape ", ShapeText(shape), " of ", by_name[0]->datatype(),
                                  " overflows a byte count"));
    }
  }
  r->tensor_bytes = static_cast<size_t>(bytes);

  // Data: registered shared memory, raw_input_contents (what tritonclient sends), or typed fp32
  // contents. Sizes are all checked before anything is allocated.
  absl::string_view* views[3] = {&r->q, &r->k, &r->v};
  for (int i = 0; i < inputs; ++i) {
    if (!shared[i].set) continue;
    const std::string what = absl::StrCat("input '", kNames[i], "'");
    if (static_cast<uint64_t>(shared[i].byte_size) != r->tensor_bytes) {
      return Invalid(absl::StrCat(what, " has shared_memory_byte_size ", shared[i].byte_size,
                                  " but shape ", ShapeText(shape), " of ",
                                  by_name[0]->datatype(), " needs ", r->tensor_bytes));
    }
    if (by_name[i]->has_contents()) {
      return Invalid(absl::StrCat(what, " is in shared memory and also carries contents"));
    }
    absl::StatusOr<SharedTensor> t =
        shared_memory.Resolve(shared[i].region, shared[i].offset, shared[i].byte_size, what);
    if (!t.ok()) return t.status();
    *views[i] = absl::string_view(reinterpret_cast<const char*>(t->data), r->tensor_bytes);
    r->input_device[i] = t->device;
    if (t->device < 0) r->host_region[i] = t->region.get();
    r->regions.push_back(std::move(t->region));
  }
  if (raw.raw_count() > 0) {
    // Triton's rule: with raw_input_contents, no input carries typed contents (they would be
    // neither read nor refused).
    for (int i = 0; i < inputs; ++i) {
      if (!shared[i].set && by_name[i]->has_contents()) {
        return Invalid(absl::StrCat("input '", kNames[i],
                                    "' carries typed contents, but the request sends "
                                    "raw_input_contents: send every input one way"));
      }
    }
    if (raw.raw_count() != static_cast<size_t>(raw_inputs)) {
      return Invalid(absl::StrCat("request has ", raw_inputs, " inputs",
                                  raw_inputs < req.inputs_size() ? " outside shared memory" : "",
                                  " but ", raw.raw_count(), " raw_input_contents"));
    }
    for (int i = 0; i < inputs; ++i) {
      if (shared[i].set) continue;
      const size_t size = raw.raw_size(static_cast<size_t>(raw_index_of[i]));
      if (size != r->tensor_bytes) {
        return Invalid(absl::StrCat("input '", kNames[i], "' has ", size,
                                    " bytes of data but shape ", ShapeText(shape), " of ",
                                    by_name[0]->datatype(), " needs ", r->tensor_bytes));
      }
    }
  } else {
    for (int i = 0; i < inputs; ++i) {
      if (shared[i].set) continue;
      const auto& contents = by_name[i]->contents().fp32_contents();
      if (r->dtype != attention::DType::kFloat32 ||
          static_cast<size_t>(contents.size()) * sizeof(float) != r->tensor_bytes) {
        return Invalid(absl::StrCat(
            "input '", kNames[i], "' carries ", contents.size(),
            " fp32_contents values but shape ", ShapeText(shape), " of ", by_name[0]->datatype(),
            " needs ", r->tensor_bytes, " bytes; send tensors in raw_input_contents"));
      }
      r->owned[i].assign(reinterpret_cast<const char*>(contents.data()), r->tensor_bytes);
      *views[i] = r->owned[i];
    }
  }

  SharedRef output_ref;
  const std::string output_name = Quote(spec.output_name());
  if (req.outputs_size() > 1) {
    return Invalid(absl::StrCat(req.outputs_size(), " outputs requested; model '", spec.name,
                                "' has one output, ", output_name));
  }
  for (const auto& out : req.outputs()) {
    if (out.name() != spec.output_name()) {
      return Invalid(absl::StrCat("requested output ", Quote(out.name()),
                                  " does not exist; model '", spec.name, "' has one output, ",
                                  output_name));
    }
    absl::StatusOr<SharedRef> ref =
        TensorParameters(out.parameters(), absl::StrCat("output ", output_name), "binary_data");
    if (!ref.ok()) return ref.status();
    output_ref = *std::move(ref);
  }
  if (output_ref.set) {
    if (static_cast<uint64_t>(output_ref.byte_size) < r->tensor_bytes) {
      return Invalid(absl::StrCat("output ", output_name, " has shared_memory_byte_size ",
                                  output_ref.byte_size, " but shape ", ShapeText(shape), " of ",
                                  by_name[0]->datatype(), " needs ", r->tensor_bytes));
    }
    absl::StatusOr<SharedTensor> t =
        shared_memory.Resolve(output_ref.region, output_ref.offset, output_ref.byte_size,
                              absl::StrCat("output ", output_name));
    if (!t.ok()) return t.status();
    r->output_target = {t->data, t->device};
    if (t->device < 0) r->host_region[3] = t->region.get();
    r->regions.push_back(std::move(t->region));
  }

  // Parameters: Triton's scheduling ones, then the operator's overrides.
  int64_t timeout_us = 0;
  bool final_flag = false;
  for (const auto& [key, value] : req.parameters()) {
    absl::StatusOr<ParamValue> v = ToParamValue(value);
    if (!v.ok()) return Invalid(absl::StrCat("request parameter ", Quote(key), " has no value"));
    if (key == "priority") {
      const uint64_t* u = std::get_if<uint64_t>(&*v);
      const int64_t* i = std::get_if<int64_t>(&*v);
      if (u == nullptr && (i == nullptr || *i < 0)) {
        return Invalid("request parameter 'priority' must be an unsigned integer");
      }
      r->priority = PriorityLevel(spec, u != nullptr ? *u : static_cast<uint64_t>(*i));
    } else if (key == "timeout") {
      const int64_t* us = std::get_if<int64_t>(&*v);
      const uint64_t* uus = std::get_if<uint64_t>(&*v);
      if ((us == nullptr || *us < 0) && uus == nullptr) {
        return Invalid("request parameter 'timeout' must be a non-negative integer (microseconds)");
      }
      timeout_us =
          us != nullptr
              ? *us
              : static_cast<int64_t>(std::min<uint64_t>(*uus, std::numeric_limits<int64_t>::max()));
    } else if (key == "triton_enable_empty_final_response") {
      // Every response of these models is final; say so, as Triton does for clients that ask.
      final_flag = std::holds_alternative<bool>(*v) && std::get<bool>(*v);
    } else if (key == "binary_data_output" || absl::StartsWith(key, "triton_")) {
      continue;  // client-protocol hints (Triton reserves the prefix); nothing to do here
    } else if (key == "sequence_id" || key == "sequence_start" || key == "sequence_end") {
      return Invalid(
          absl::StrCat("request parameter ", Quote(key), ": sequence batching is not supported"));
    } else {
      absl::Status s = ApplyOperatorParameter(key, *v, "request parameter", &r->options);
      if (!s.ok()) return s;
    }
  }
  r->deadline = std::min(rpc_deadline, arrival + RequestTimeout(spec, timeout_us));

  // The operator's own validation and the engine's support check: the same selector the
  // execution uses, so nothing accepted here can be refused later for its configuration.
  absl::StatusOr<PlanFacts> facts = model->engine().Supports(*r);
  if (!facts.ok()) return facts.status();
  r->kept_pairs = facts->kept_pairs;

  // Once the GPUs stopped, before anything is leased (their pinned pool cannot grow) or copied.
  if (absl::Status s = model->engine().Available(); !s.ok()) return s;

  if (raw.raw_count() > 0) {
    // One copy, from gRPC's buffers into staging memory (pinned on a GPU server). Large contents
    // are copied on threads of their own while the request already waits in its queue, so that
    // a long job starts on its first rows (server/input_fill.h). A full pool does not hold the
    // request up: the heap takes it instead, copied here.
    const size_t total = static_cast<size_t>(raw_inputs) * r->tensor_bytes;
    absl::StatusOr<memory::Buffer> lease = model->engine().staging_pool().Acquire(total);
    const bool background = lease.ok() && total >= kBackgroundCopyMinBytes && r->tokens() > 0;
    std::vector<void*> dsts;
    std::vector<size_t> raw_of;  // per destination, its raw_input_contents index
    for (int i = 0; i < inputs; ++i) {
      if (shared[i].set) continue;
      char* dst;
      if (lease.ok()) {
        dst = static_cast<char*>(lease->data()) +
              static_cast<size_t>(raw_index_of[i]) * r->tensor_bytes;
      } else {
        r->owned[i].resize(r->tensor_bytes);
        dst = r->owned[i].data();
      }
      if (background) {
        dsts.push_back(dst);
        raw_of.push_back(static_cast<size_t>(raw_index_of[i]));
      } else {
        raw.CopyRaw(static_cast<size_t>(raw_index_of[i]), dst);
      }
      *views[i] = absl::string_view(dst, r->tensor_bytes);
    }
    if (lease.ok()) r->input = *std::move(lease);
    if (background) {
      const int threads =
          static_cast<int>(std::clamp<size_t>(total / kCopyBytesPerThread, 1, kMaxCopyThreads));
      r->fill = InputFill::Start(
          r->tokens(), r->tensor_bytes / static_cast<size_t>(r->tokens()), std::move(dsts),
          [raw, raw_of](int t, size_t offset, size_t bytes, void* dst) {
            raw.CopyRawRange(raw_of[static_cast<size_t>(t)], offset, bytes, dst);
          },
          threads);
    }
  }
  r->batch_key = BatchKey(*r);

  response->set_model_name(spec.name);
  response->set_model_version(spec.version);
  response->set_id(req.id());
  if (final_flag) (*response->mutable_parameters())["triton_final_response"].set_bool_param(true);
  auto* out = response->add_outputs();
  out->set_name(spec.output_name());
  out->set_datatype(DatatypeName(r->dtype));
  for (int64_t d : shape) out->add_shape(d);
  if (output_ref.set) {
    auto& params = *out->mutable_parameters();
    params["shared_memory_region"].set_string_param(output_ref.region);
    params["shared_memory_byte_size"].set_int64_param(static_cast<int64_t>(r->tensor_bytes));
    params["shared_memory_offset"].set_int64_param(output_ref.offset);
  }
  return r;
}

}  // namespace

absl::StatusOr<std::unique_ptr<InferenceRequest>> ParseInferRequest(
    const ModelInferRequest& req, const RequestBytes& raw, const ModelRegistry& registry,
    const SharedMemoryManager& shared_memory, absl::Time arrival, absl::Time rpc_deadline,
    inference::ModelInferResponse* response) {
  absl::StatusOr<Model*> found = registry.Find(req.model_name(), req.model_version());
  if (!found.ok()) return found.status();
  absl::StatusOr<std::unique_ptr<InferenceRequest>> parsed =
      ParseForModel(*found, req, raw, shared_memory, arrival, rpc_deadline, response);
  if (!parsed.ok()) CountRefusedRequest(*found, arrival, parsed.status());
  return parsed;
}

}  // namespace dilattn::server
