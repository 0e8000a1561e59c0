#include "client/client.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "kernels/common/clock.h"
#include "kernels/common/small_file.h"

namespace dilattn::client {
namespace {

const char* Datatype(attention::DType t) {
  switch (t) {
    case attention::DType::kFloat32:
      return "FP32";
    case attention::DType::kFloat16:
      return "FP16";
    case attention::DType::kBFloat16:
      return "BF16";
  }
  return "";
}

// protobuf cannot serialize a message of 2 GiB or more (and gRPC aborts on the attempt).
absl::Status CheckMessageSize(const google::protobuf::Message& m) {
  const size_t bytes = m.ByteSizeLong();
  if (bytes > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request needs ", bytes,
                     " bytes, more than one message can carry (2 GiB); "
                     "send it through Attend (dilattn.v1), which streams it in chunks"));
  }
  return absl::OkStatus();
}

void SetDeadline(grpc::ClientContext* ctx, absl::Duration timeout) {
  if (timeout != absl::InfiniteDuration()) {
    ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(timeout));
  }
}

// A stream response's error_message as a status. Triton's carries only text, and this server
// puts only the message there too, so the code is UNKNOWN unless a server spelled it out in
// front of the text ("RESOURCE_EXHAUSTED: ..."), as absl::Status::ToString does.
absl::Status StreamError(const std::string& id, absl::string_view message) {
  absl::StatusCode code = absl::StatusCode::kUnknown;
  for (int c = 1; c <= static_cast<int>(absl::StatusCode::kUnauthenticated); ++c) {
    const std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(c));
    if (absl::ConsumePrefix(&message, absl::StrCat(name, ": "))) {
      code = static_cast<absl::StatusCode>(c);
      break;
    }
  }
  return absl::Status(code, absl::StrCat("request '", id, "': ", message));
}

// A "timeout" parameter's text: microseconds, as Triton's `timeout` and the native header's
// timeout_microseconds take them.
absl::StatusOr<int64_t> TimeoutMicroseconds(const std::string& value) {
  int64_t micros;
  if (!absl::SimpleAtoi(value, &micros) || micros < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parameter 'timeout' must be a non-negative integer of microseconds, not '", value, "'"));
  }
  return micros;
}

// Triton's scheduling parameters are integers on the wire; the server refuses them as strings.
absl::StatusOr<inference::InferParameter> RequestParameter(const std::string& key,
                                                           const std::string& value) {
  inference::InferParameter p;
  if (key == "priority") {
    uint64_t level;
    if (!absl::SimpleAtoi(value, &level)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter 'priority' must be an unsigned integer (0: the model's default), not '", value,
          "'"));
    }
    p.set_uint64_param(level);
  } else if (key == "timeout") {
    absl::StatusOr<int64_t> micros = TimeoutMicroseconds(value);
    if (!micros.ok()) return micros.status();
    p.set_int64_param(*micros);
  } else {
    p.set_string_param(value);
  }
  return p;
}

}  // namespace

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::StatusOr<size_t> TensorBytes(attention::DType dtype, const std::vector<int64_t>& shape) {
  int64_t bytes = static_cast<int64_t>(attention::DTypeSize(dtype));
  for (int64_t d : shape) {
    if (d < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape [", absl::StrJoin(shape, ","), "] has a dim below 1"));
    }
    if (__builtin_mul_overflow(bytes, d, &bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape [", absl::StrJoin(shape, ","), "] overflows a byte count"));
    }
  }
  return static_cast<size_t>(bytes);
}

absl::StatusOr<Tensor> RandomTensor(attention::DType dtype, const std::vector<int64_t>& shape,
                                    uint64_t seed) {
  absl::StatusOr<size_t> bytes = TensorBytes(dtype, shape);
  if (!bytes.ok()) return bytes.status();
  Tensor t;
  t.dtype = dtype;
  t.shape = shape;
  const size_t n = *bytes / attention::DTypeSize(dtype);
  t.bytes.resize(*bytes);
  uint64_t state = seed;
  for (size_t i = 0; i < n; ++i) {
    state += 0x9E3779B97F4A7C15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(static_cast<double>(z >> 40) / 16777216.0 * 2 - 1);
    attention::StoreFromFloat(t.bytes.data(), dtype, i, u);
  }
  return t;
}

absl::StatusOr<inference::ModelInferRequest> MakeInferRequest(const InferOptions& options,
                                                              const NamedInputs& inputs) {
  inference::ModelInferRequest req;
  req.set_model_name(options.model);
  req.set_id(options.id);
  for (const auto& [key, value] : options.parameters) {
    absl::StatusOr<inference::InferParameter> p = RequestParameter(key, value);
    if (!p.ok()) return p.status();
    (*req.mutable_parameters())[key] = *std::move(p);
  }
  for (const auto& [name, t] : inputs) {
    auto* in = req.add_inputs();
    in->set_name(name);
    in->set_datatype(Datatype(t->dtype));
    for (int64_t d : t->shape) in->add_shape(d);
    req.add_raw_input_contents(t->bytes);
  }
  return req;
}

absl::StatusOr<inference::ModelInferRequest> MakeInferRequest(const InferOptions& options,
                                                              const Tensor& q, const Tensor& k,
                                                              const Tensor& v) {
  return MakeInferRequest(options, NamedInputs{{"Q", &q}, {"K", &k}, {"V", &v}});
}

absl::StatusOr<dilattn::v1::Header> MakeAttendHeader(const AttendOptions& options,
                                                     attention::DType dtype,
                                                     const std::vector<int64_t>& shape) {
  if (options.timeout_microseconds < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("timeout_microseconds must be >= 0 (0: the model's default), not ",
                     options.timeout_microseconds));
  }
  uint32_t priority = options.priority;
  int64_t timeout = options.timeout_microseconds;
  dilattn::v1::Header h;
  // The header's parameters are the operator's alone: the scheduling ones go in its fields.
  for (const auto& [key, value] : options.parameters) {
    if (key == "priority") {
      uint32_t level;
      if (!absl::SimpleAtoi(value, &level)) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter 'priority' must be an unsigned 32-bit integer (0: the "
                         "model's default), not '",
                         value, "'"));
      }
      if (priority != 0 && level != priority) {
        return absl::InvalidArgumentError(
            absl::StrCat("priority ", priority, " and parameter 'priority' ", level, " disagree"));
      }
      priority = level;
    } else if (key == "timeout") {
      absl::StatusOr<int64_t> micros = TimeoutMicroseconds(value);
      if (!micros.ok()) return micros.status();
      if (timeout != 0 && *micros != timeout) {
        return absl::InvalidArgumentError(absl::StrCat(
            "timeout_microseconds ", timeout, " and parameter 'timeout' ", *micros, " disagree"));
      }
      timeout = *micros;
    } else {
      (*h.mutable_parameters())[key] = value;
    }
  }
  h.set_model(options.model);
  h.set_id(options.id);
  h.set_priority(priority);
  h.set_timeout_microseconds(timeout);
  dilattn::v1::DataType datatype = dilattn::v1::DATA_TYPE_UNSPECIFIED;
  dilattn::v1::DataType_Parse(Datatype(dtype), &datatype);  // the enum's names are KServe's
  h.set_datatype(datatype);
  for (int64_t d : shape) h.add_shape(d);
  return h;
}

absl::StatusOr<Tensor> OutputFromResponse(const inference::ModelInferResponse& response) {
  if (response.outputs_size() != 1 || response.raw_output_contents_size() != 1 ||
      response.outputs(0).shape_size() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "response has ", response.outputs_size(), " outputs and ",
        response.raw_output_contents_size(), " raw contents; expected one of each with a shape"));
  }
  const auto& out = response.outputs(0);
  Tensor t;
  absl::StatusOr<attention::DType> dtype = attention::ParseDType(out.datatype());
  if (!dtype.ok()) return dtype.status();
  t.dtype = *dtype;
  t.shape.assign(out.shape().begin(), out.shape().end());
  t.bytes = response.raw_output_contents(0);
  return t;
}

namespace {

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials(const ChannelOptions& o) {
  if (!o.tls) return grpc::InsecureChannelCredentials();
  if (o.cert.empty() != o.key.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate and its key go together (mutual TLS needs both)");
  }
  grpc::SslCredentialsOptions ssl;
  for (auto [what, path, out] : {std::tuple{"CA file", &o.ca, &ssl.pem_root_certs},
                                 std::tuple{"certificate", &o.cert, &ssl.pem_cert_chain},
                                 std::tuple{"key", &o.key, &ssl.pem_private_key}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> text = ReadSmallFile(what, *path);
    if (!text.ok()) return text.status();
    *out = *std::move(text);
  }
  return grpc::SslCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const std::string& target,
                                                       const ChannelOptions& channel) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials = Credentials(channel);
  if (!credentials.ok()) return credentials.status();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(INT_MAX);
  args.SetMaxSendMessageSize(INT_MAX);
  auto c = std::unique_ptr<Client>(new Client());
  c->channel_ = grpc::CreateCustomChannel(target, *credentials, args);
  if (c->channel_ == nullptr) {
    return absl::InvalidArgumentError("cannot create a channel to " + target);
  }
  c->stub_ = inference::GRPCInferenceService::NewStub(c->channel_);
  c->health_ = grpc::health::v1::Health::NewStub(c->channel_);
  c->attend_ = dilattn::v1::DilatedAttention::NewStub(c->channel_);
  return c;
}

absl::StatusOr<bool> Client::ServerLive() {
  grpc::ClientContext ctx;
  inference::ServerLiveResponse resp;
  if (grpc::Status s = stub_->ServerLive(&ctx, {}, &resp); !s.ok()) return FromGrpc(s);
  return resp.live();
}

absl::StatusOr<bool> Client::ServerReady() {
  grpc::ClientContext ctx;
  inference::ServerReadyResponse resp;
  if (grpc::Status s = stub_->ServerReady(&ctx, {}, &resp); !s.ok()) return FromGrpc(s);
  return resp.ready();
}

absl::StatusOr<bool> Client::ModelReady(const std::string& model) {
  grpc::ClientContext ctx;
  inference::ModelReadyRequest req;
  req.set_name(model);
  inference::ModelReadyResponse resp;
  if (grpc::Status s = stub_->ModelReady(&ctx, req, &resp); !s.ok()) return FromGrpc(s);
  return resp.ready();
}

absl::StatusOr<std::string> Client::Health(const std::string& service) {
  grpc::ClientContext ctx;
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  if (grpc::Status s = health_->Check(&ctx, req, &resp); !s.ok()) return FromGrpc(s);
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
}

absl::StatusOr<inference::ServerMetadataResponse> Client::ServerMetadata() {
  grpc::ClientContext ctx;
  inference::ServerMetadataResponse resp;
  if (grpc::Status s = stub_->ServerMetadata(&ctx, {}, &resp); !s.ok()) return FromGrpc(s);
  return resp;
}

absl::StatusOr<inference::ModelMetadataResponse> Client::ModelMetadata(const std::string& model) {
  grpc::ClientContext ctx;
  inference::ModelMetadataRequest req;
  req.set_name(model);
  inference::ModelMetadataResponse resp;
  if (grpc::Status s = stub_->ModelMetadata(&ctx, req, &resp); !s.ok()) return FromGrpc(s);
  return resp;
}

absl::StatusOr<inference::ModelStatisticsResponse> Client::ModelStatistics(
    const std::string& model) {
  grpc::ClientContext ctx;
  inference::ModelStatisticsRequest req;
  req.set_name(model);
  inference::ModelStatisticsResponse resp;
  if (grpc::Status s = stub_->ModelStatistics(&ctx, req, &resp); !s.ok()) return FromGrpc(s);
  return resp;
}

absl::StatusOr<Tensor> Client::Infer(const InferOptions& options, const Tensor& q, const Tensor& k,
                                     const Tensor& v) {
  return Infer(options, NamedInputs{{"Q", &q}, {"K", &k}, {"V", &v}});
}

absl::StatusOr<Tensor> Client::Infer(const InferOptions& options, const NamedInputs& inputs) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, options.timeout);
  inference::ModelInferResponse resp;
  const absl::StatusOr<inference::ModelInferRequest> req = MakeInferRequest(options, inputs);
  if (!req.ok()) return req.status();
  if (absl::Status s = CheckMessageSize(*req); !s.ok()) return s;
  if (grpc::Status s = stub_->ModelInfer(&ctx, *req, &resp); !s.ok()) return FromGrpc(s);
  return OutputFromResponse(resp);
}

absl::StatusOr<std::unique_ptr<Client::Stream>> Client::OpenStream() {
  auto stream = std::unique_ptr<Stream>(new Stream());
  stream->stream_ = stub_->ModelStreamInfer(&stream->context_);
  if (stream->stream_ == nullptr) return absl::UnavailableError("cannot open ModelStreamInfer");
  return stream;
}

absl::Status Client::Stream::End() {
  // Held through Finish, so that a Send and a Receive failing together wait for the one call.
  absl::MutexLock lock(&mu_);
  if (!ended_) {
    const absl::Status end = FromGrpc(stream_->Finish());
    final_status_ = end.ok() ? absl::OutOfRangeError("the stream has ended") : end;
    ended_ = true;
  }
  return final_status_;
}

bool Client::Stream::ended() const {
  absl::MutexLock lock(&mu_);
  return ended_;
}

absl::Status Client::Stream::Send(const inference::ModelInferRequest& request) {
  {
    absl::MutexLock lock(&mu_);
    if (ended_) return final_status_;
    if (writes_done_) return absl::FailedPreconditionError("Send after CloseSend");
  }
  if (absl::Status s = CheckMessageSize(request); !s.ok()) return s;
  if (!stream_->Write(request)) return End();
  return absl::OkStatus();
}

absl::StatusOr<inference::ModelInferResponse> Client::Stream::Receive() {
  {
    absl::MutexLock lock(&mu_);
    if (ended_) return final_status_;
  }
  inference::ModelStreamInferResponse resp;
  if (!stream_->Read(&resp)) return End();
  if (!resp.error_message().empty()) {
    return StreamError(resp.infer_response().id(), resp.error_message());
  }
  return std::move(*resp.mutable_infer_response());
}

absl::Status Client::Stream::CloseSend() {
  {
    absl::MutexLock lock(&mu_);
    // A second WritesDone, like a second Finish, is an operation gRPC aborts on.
    if (ended_ || writes_done_) return absl::OkStatus();
    writes_done_ = true;
  }
  if (!stream_->WritesDone()) return absl::UnavailableError("stream closed by the server");
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Client::Attend(const AttendOptions& options, const Tensor& q,
                                      const Tensor& k, const Tensor& v, AttendStats* stats) {
  if (q.shape.size() != 4) {
    return absl::InvalidArgumentError("the native stream carries Q, K, V of shape [B, N, H, D]");
  }
  const Tensor* in[3] = {&q, &k, &v};
  for (const Tensor* t : in) {
    if (t->shape != q.shape || t->dtype != q.dtype || t->bytes.size() != q.bytes.size()) {
      return absl::InvalidArgumentError("Q, K and V must share one shape, dtype and size");
    }
  }
  // Checked first, so that the products below cannot overflow.
  absl::StatusOr<size_t> bytes = TensorBytes(q.dtype, q.shape);
  if (!bytes.ok()) return bytes.status();
  if (*bytes != q.bytes.size()) {
    return absl::InvalidArgumentError("Q's bytes do not match its shape");
  }
  dilattn::v1::AttendRequest msg;
  {
    absl::StatusOr<dilattn::v1::Header> header = MakeAttendHeader(options, q.dtype, q.shape);
    if (!header.ok()) return header.status();
    *msg.mutable_header() = *std::move(header);
  }
  const int64_t tokens = q.shape[0] * q.shape[1];
  const size_t token_bytes = q.bytes.size() / static_cast<size_t>(tokens);
  const int64_t per_chunk =
      std::max<int64_t>(1, static_cast<int64_t>(options.chunk_bytes / token_bytes));

  grpc::ClientContext ctx;
  SetDeadline(&ctx, options.timeout);
  auto stream = attend_->Attend(&ctx);
  const absl::Time start = MonotonicNow();
  Tensor out;
  out.dtype = q.dtype;
  out.shape = q.shape;
  out.bytes.resize(q.bytes.size());
  absl::Status read_status;
  bool cancelled_here = false;  // the reader found the output malformed and cancelled the call
  AttendStats seen;
  // The reader runs beside the writer: the server streams O back before the input is complete.
  std::thread reader([&] {
    dilattn::v1::AttendResponse r;
    int64_t at = 0;
    while (stream->Read(&r)) {
      if (r.has_accepted()) {
        seen.stretch_tokens = r.accepted().stretch_tokens();
        continue;
      }
      const auto& chunk = r.output();
      if (at == 0) seen.first_output = MonotonicNow() - start;
      if (chunk.token() != at || chunk.data().size() % token_bytes != 0 ||
          chunk.data().size() > out.bytes.size() - static_cast<size_t>(at) * token_bytes) {
        read_status = absl::InternalError(absl::StrCat("output chunk at token ", chunk.token(),
                                                       " out of order or size; expected ", at));
        cancelled_here = true;
        ctx.TryCancel();
        return;
      }
      std::memcpy(out.bytes.data() + static_cast<size_t>(at) * token_bytes, chunk.data().data(),
                  chunk.data().size());
      at += static_cast<int64_t>(chunk.data().size() / token_bytes);
    }
    if (at != tokens && read_status.ok()) {
      read_status = absl::InternalError(
          absl::StrCat("the output ended after ", at, " of ", tokens, " tokens"));
    }
  });

  bool writing = stream->Write(msg);
  for (int64_t first = 0; writing && first < tokens; first += per_chunk) {
    const int64_t n = std::min(per_chunk, tokens - first);
    for (int t = 0; t < 3 && writing; ++t) {
      msg.Clear();
      dilattn::v1::Chunk* c = msg.mutable_chunk();
      c->set_tensor(static_cast<dilattn::v1::Tensor>(dilattn::v1::Q + t));
      c->set_token(first);
      c->set_data(in[t]->bytes.data() + static_cast<size_t>(first) * token_bytes,
                  static_cast<size_t>(n) * token_bytes);
      writing = stream->Write(msg);
    }
  }
  if (writing) stream->WritesDone();
  reader.join();
  const grpc::Status end = stream->Finish();
  // The call then ends CANCELLED, which says nothing of why.
  if (cancelled_here) return read_status;
  if (!end.ok()) return FromGrpc(end);
  if (!read_status.ok()) return read_status;
  seen.total = MonotonicNow() - start;
  if (stats != nullptr) *stats = seen;
  return out;
}

}  // namespace dilattn::client
