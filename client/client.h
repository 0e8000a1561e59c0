#pragma once

// C++ client of dilattn-server (any KServe v2 server): health, metadata, unary and streaming
// inference (the attention models' Q, K, V -> O, the multihead models' X -> Y), and dilattn's
// native chunked stream for sequences larger than one message.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dilattn/v1/attention.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/sync_stream.h"
#include "inference/grpc_service.grpc.pb.h"
#include "kernels/attention/attention.h"

namespace dilattn::client {

// A tensor as raw little-endian bytes: (B, N, H, D) for attention, (B, N, E) for hidden states.
struct Tensor {
  attention::DType dtype = attention::DType::kFloat32;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Fills a tensor of this shape with uniform values in [-1, 1) from `seed`.
Tensor RandomTensor(attention::DType dtype, const std::vector<int64_t>& shape, uint64_t seed);

// Named inputs of one request: {"Q", &q}, {"K", &k}, {"V", &v}, or {"X", &x}.
using NamedInputs = std::vector<std::pair<std::string, const Tensor*>>;

struct InferOptions {
  std::string model = "dilated_attention";
  std::string id;
  // Request parameters as strings ("segment_lengths" -> "2048,4096", "causal" -> "true"); the
  // server accepts string values for every parameter.
  std::map<std::string, std::string> parameters;
  absl::Duration timeout = absl::InfiniteDuration();  // the RPC deadline
};

// Builds the KServe request for these inputs (the server answers with the model's one output).
inference::ModelInferRequest MakeInferRequest(const InferOptions& options,
                                              const NamedInputs& inputs);
// The same for Q, K, V.
inference::ModelInferRequest MakeInferRequest(const InferOptions& options, const Tensor& q,
                                              const Tensor& k, const Tensor& v);
// The response's one output (O, or a multihead model's Y); INVALID_ARGUMENT when it has none.
absl::StatusOr<Tensor> OutputFromResponse(const inference::ModelInferResponse& response);

absl::Status FromGrpc(const grpc::Status& status);

struct AttendOptions {
  std::string model = "dilated_attention";
  std::string id;
  std::map<std::string, std::string> parameters;  // as InferOptions
  uint32_t priority = 0;                          // 0: the model's default level
  size_t chunk_bytes = (size_t{4} << 20) - 1024;  // data per input chunk (whole tokens)
  absl::Duration timeout = absl::InfiniteDuration();
};

// What the server said of a native stream, and when.
struct AttendStats {
  int64_t stretch_tokens = 0;
  absl::Duration first_output;  // from the header's send to the first output chunk
  absl::Duration total;
};

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Create(const std::string& target);

  absl::StatusOr<bool> ServerLive();
  absl::StatusOr<bool> ServerReady();
  absl::StatusOr<bool> ModelReady(const std::string& model);
  // grpc.health.v1 status of a service ("" for the whole server, or a model name).
  absl::StatusOr<std::string> Health(const std::string& service);
  absl::StatusOr<inference::ServerMetadataResponse> ServerMetadata();
  absl::StatusOr<inference::ModelMetadataResponse> ModelMetadata(const std::string& model);
  absl::StatusOr<inference::ModelStatisticsResponse> ModelStatistics(const std::string& model);

  absl::StatusOr<Tensor> Infer(const InferOptions& options, const Tensor& q, const Tensor& k,
                               const Tensor& v);
  absl::StatusOr<Tensor> Infer(const InferOptions& options, const NamedInputs& inputs);

  // A ModelStreamInfer stream: Send any number of requests, Receive their responses in
  // completion order, CloseSend when done.
  class Stream {
   public:
    absl::Status Send(const inference::ModelInferRequest& request);
    // A response, or an error: the stream's status at its end, or error_message for one request.
    absl::StatusOr<inference::ModelInferResponse> Receive();
    absl::Status CloseSend();

   private:
    friend class Client;
    grpc::ClientContext context_;
    std::unique_ptr<grpc::ClientReaderWriter<inference::ModelInferRequest,
                                             inference::ModelStreamInferResponse>>
        stream_;
  };
  absl::StatusOr<std::unique_ptr<Stream>> OpenStream();

  // One problem through dilattn.v1.DilatedAttention/Attend: Q, K and V go out in chunks while
  // another thread collects O, which the server returns stretch by stretch as the input arrives.
  // No message holds more than a chunk, so N is bounded by memory, not by gRPC's message limit.
  absl::StatusOr<Tensor> Attend(const AttendOptions& options, const Tensor& q, const Tensor& k,
                                const Tensor& v, AttendStats* stats = nullptr);

  inference::GRPCInferenceService::Stub& stub() { return *stub_; }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::unique_ptr<dilattn::v1::DilatedAttention::Stub> attend_;
};

}  // namespace dilattn::client
