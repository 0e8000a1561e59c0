#pragma once

// Zero-copy framing of the KServe messages that carry tensors. A ModelInferRequest is split into
// its small fields, parsed by protobuf as usual, and its raw_input_contents, which stay in
// gRPC's receive buffers until they are copied once, straight into the request's staging lease.
// A response is serialized without its raw output, which is appended as a slice over the
// engine's output lease and returned to the pool when gRPC has sent it.

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "inference/grpc_service.pb.h"
#include "kernels/memory/buffer_pool.h"

namespace dilattn::server {

class RequestBytes {
 public:
  // INVALID_ARGUMENT when the bytes are not a well-formed ModelInferRequest.
  static absl::StatusOr<RequestBytes> Split(const grpc::ByteBuffer& message,
                                            inference::ModelInferRequest* header);

  size_t raw_count() const { return raw_.size(); }
  size_t raw_size(size_t i) const { return raw_[i].length; }
  // Copies raw_input_contents[i] to dst (raw_size(i) bytes).
  void CopyRaw(size_t i, void* dst) const;

 private:
  struct Field {
    size_t slice;
    size_t offset;
    size_t length;
  };
  std::vector<grpc::Slice> slices_;
  std::vector<Field> raw_;
};

// `header` (whose raw_output_contents must be empty) with `bytes` of `output` appended as
// raw_output_contents[0]; the lease lives until gRPC releases the message. An output that went
// to shared memory is sent as an empty raw_output_contents[0] (bytes 0), as Triton does: its C++
// client reads one entry per output.
grpc::ByteBuffer InferResponseBytes(const inference::ModelInferResponse& header,
                                    memory::Buffer output, size_t bytes);
// The same inside a ModelStreamInferResponse (infer_response holds the header).
grpc::ByteBuffer StreamResponseBytes(const inference::ModelStreamInferResponse& header,
                                     memory::Buffer output, size_t bytes);

}  // namespace dilattn::server
