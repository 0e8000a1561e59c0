#pragma once

// Zero-copy framing of the messages that carry tensors. A ModelInferRequest is split into its
// small fields, parsed by protobuf as usual, and its raw_input_contents, which stay in gRPC's
// receive buffers until they are copied once, straight into the request's staging lease. A
// response is serialized without its raw output, which is appended as a slice over the engine's
// output lease and returned to the pool when gRPC has sent it. The native stream's chunks and
// output chunks travel the same way.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "dilattn/v1/attention.pb.h"
#include "inference/grpc_service.pb.h"
#include "kernels/memory/buffer_pool.h"

namespace dilattn::server {

// Copies out of a received message take a thread per kCopyBytesPerThread, up to
// kMaxCopyThreads: one thread copies at a fraction of the memory bandwidth.
inline constexpr size_t kCopyBytesPerThread = size_t{32} << 20;
inline constexpr size_t kMaxCopyThreads = 8;

// A run of bytes inside a received message's slices.
struct SliceRange {
  size_t slice = 0;
  size_t offset = 0;
  size_t length = 0;
};

class RequestBytes {
 public:
  // INVALID_ARGUMENT when the bytes are not a well-formed ModelInferRequest.
  static absl::StatusOr<RequestBytes> Split(const grpc::ByteBuffer& message,
                                            inference::ModelInferRequest* header);

  size_t raw_count() const { return raw_.size(); }
  size_t raw_size(size_t i) const { return raw_[i].length; }
  // Copies raw_input_contents[i] to dst (raw_size(i) bytes).
  void CopyRaw(size_t i, void* dst) const;
  // Copies bytes [offset, offset + bytes) of raw_input_contents[i] to dst, on the calling thread.
  void CopyRawRange(size_t i, size_t offset, size_t bytes, void* dst) const;

 private:
  std::vector<grpc::Slice> slices_;
  std::vector<size_t> slice_starts_;  // where each slice starts in the message
  std::vector<SliceRange> raw_;
};

// One dilattn.v1.AttendRequest as received: its header parsed by protobuf, or its chunk's fields
// with the data left in gRPC's receive buffers until CopyData copies it once, straight into the
// stream's lease. Parsed as protobuf parses it: the last of the oneof's fields present wins,
// repeated occurrences of a message merge, unknown fields are skipped.
class AttendBytes {
 public:
  // INVALID_ARGUMENT when the bytes are not a well-formed dilattn.v1.AttendRequest.
  static absl::StatusOr<AttendBytes> Parse(const grpc::ByteBuffer& message);

  bool has_header() const { return which_ == Which::kHeader; }
  bool has_chunk() const { return which_ == Which::kChunk; }
  const dilattn::v1::Header& header() const { return header_; }
  int32_t tensor() const { return tensor_; }
  int64_t token() const { return token_; }
  size_t data_size() const { return data_.length; }
  void CopyData(void* dst) const;

 private:
  enum class Which { kNone, kHeader, kChunk };
  Which which_ = Which::kNone;
  std::vector<grpc::Slice> slices_;
  dilattn::v1::Header header_;
  int32_t tensor_ = 0;
  int64_t token_ = 0;
  SliceRange data_;
};

// An AttendResponse whose output chunk starts at `token` and holds `bytes` of `lease` from
// `offset`, sent without a copy: the message's slice keeps the lease alive until gRPC lets go.
grpc::ByteBuffer AttendOutputBytes(int64_t token, std::shared_ptr<const memory::Buffer> lease,
                                   size_t offset, size_t bytes);

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
