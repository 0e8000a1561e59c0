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

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
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

// The bytes of a tensor of this shape; INVALID_ARGUMENT for a dim below 1 or a size that does not
// fit in int64, so that callers can refuse a shape before allocating for it.
absl::StatusOr<size_t> TensorBytes(attention::DType dtype, const std::vector<int64_t>& shape);

// Fills a tensor of this shape with uniform values in [-1, 1) from `seed`; TensorBytes' errors.
absl::StatusOr<Tensor> RandomTensor(attention::DType dtype, const std::vector<int64_t>& shape,
                                    uint64_t seed);

// Named inputs of one request: {"Q", &q}, {"K", &k}, {"V", &v}, or {"X", &x}.
using NamedInputs = std::vector<std::pair<std::string, const Tensor*>>;

struct InferOptions {
  std::string model = "dilated_attention";
  std::string id;
  // Request parameters as text ("segment_lengths" -> "2048,4096", "causal" -> "true"). They go
  // out as string parameters, which the server parses for the operator's parameters, except
  // Triton's scheduling ones, which it accepts only as integers: "priority" goes out as a
  // uint64 and "timeout" (microseconds) as an int64, and a value that is not such an integer is
  // refused before sending.
  std::map<std::string, std::string> parameters;
  absl::Duration timeout = absl::InfiniteDuration();  // the RPC deadline
};

// Builds the KServe request for these inputs (the server answers with the model's one output);
// INVALID_ARGUMENT for a "priority" or "timeout" parameter that is not a non-negative integer.
absl::StatusOr<inference::ModelInferRequest> MakeInferRequest(const InferOptions& options,
                                                              const NamedInputs& inputs);
// The same for Q, K, V.
absl::StatusOr<inference::ModelInferRequest> MakeInferRequest(const InferOptions& options,
                                                              const Tensor& q, const Tensor& k,
                                                              const Tensor& v);
// The response's one output (O, or a multihead model's Y); INVALID_ARGUMENT when it has none.
absl::StatusOr<Tensor> OutputFromResponse(const inference::ModelInferResponse& response);

absl::Status FromGrpc(const grpc::Status& status);

struct AttendOptions {
  std::string model = "dilated_attention";
  std::string id;
  // The operator's parameters, as in InferOptions. The native header has fields of their own for
  // Triton's scheduling parameters: a "priority" parameter (an unsigned integer) and a "timeout"
  // one (non-negative microseconds) are sent there, not as parameters.
  std::map<std::string, std::string> parameters;
  uint32_t priority = 0;  // 0: the model's default level
  // How long each stretch may wait in the model's queue, from when its input is complete (the
  // header's timeout_microseconds, as KServe's `timeout`); 0: the model's default timeout.
  int64_t timeout_microseconds = 0;
  size_t chunk_bytes = (size_t{4} << 20) - 1024;      // data per input chunk (whole tokens)
  absl::Duration timeout = absl::InfiniteDuration();  // the RPC deadline, of the whole stream
};

// The native stream's header for a problem of this dtype and shape, with the "priority" and
// "timeout" parameters moved into its fields; INVALID_ARGUMENT for a value that is not such an
// integer, a negative timeout, or a parameter that disagrees with its field.
absl::StatusOr<dilattn::v1::Header> MakeAttendHeader(const AttendOptions& options,
                                                     attention::DType dtype,
                                                     const std::vector<int64_t>& shape);

// What the server said of a native stream, and when.
struct AttendStats {
  int64_t stretch_tokens = 0;
  absl::Duration first_output;  // from the header's send to the first output chunk
  absl::Duration total;
};

// How the channel reaches the server: plaintext unless `tls`; the files are PEM.
struct ChannelOptions {
  bool tls = false;
  std::string ca;    // CAs the server's certificate must chain to; empty: the system's
  std::string cert;  // mutual TLS: this client's certificate chain, and
  std::string key;   // its private key
};

class Client {
 public:
  // INVALID_ARGUMENT, naming the file, when a TLS file cannot be read, or only one of the
  // client's certificate and key is given.
  static absl::StatusOr<std::unique_ptr<Client>> Create(const std::string& target,
                                                        const ChannelOptions& channel = {});

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
  // completion order, CloseSend when done. One thread may Send while another Receives.
  class Stream {
   public:
    // Once the stream has ended, the status it ended with (OUT_OF_RANGE where that was OK).
    absl::Status Send(const inference::ModelInferRequest& request);
    // A response, or an error: the stream's status once it has ended (OUT_OF_RANGE where that
    // was OK), or one request's error_message while it goes on; ended() tells them apart. The
    // error_message's code is UNKNOWN, as Triton's carries only text, unless the text starts
    // with a code's name ("RESOURCE_EXHAUSTED: ...").
    absl::StatusOr<inference::ModelInferResponse> Receive();
    // Ends the sending side; OK when it already ended or the stream has.
    absl::Status CloseSend();
    // Whether the stream has ended: Send and Receive return its final status from then on.
    bool ended() const;

   private:
    friend class Client;
    // The stream's final status, from its one call to Finish (gRPC aborts on a second).
    absl::Status End() ABSL_LOCKS_EXCLUDED(mu_);

    grpc::ClientContext context_;
    std::unique_ptr<
        grpc::ClientReaderWriter<inference::ModelInferRequest, inference::ModelStreamInferResponse>>
        stream_;
    mutable absl::Mutex mu_;
    bool ended_ ABSL_GUARDED_BY(mu_) = false;
    absl::Status final_status_ ABSL_GUARDED_BY(mu_);
    bool writes_done_ ABSL_GUARDED_BY(mu_) = false;
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
