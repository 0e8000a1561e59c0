#pragma once

// dilattn.v1.DilatedAttention: one problem per stream, for sequences too long for one KServe
// message. Q, K and V arrive in chunks straight into one staging lease (with room for O); each
// stretch of a sequence whose tokens have all arrived becomes an ordinary request of the model,
// scheduled, batched and computed like any other, with its output written into the lease; O
// streams back in token order while later chunks are still arriving.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dilattn/v1/attention.grpc.pb.h"
#include "server/grpc/rpc_gate.h"
#include "server/metrics.h"
#include "server/model_registry.h"
#include "server/operator_options.h"
#include "server/request.h"

namespace dilattn::server {

// An output message is at most this large, or the server's message limit if that is lower:
// gRPC clients accept 4 MiB by default.
inline constexpr size_t kAttendMessageBytes = size_t{4} << 20;
// Room left in a message for everything but the chunk's data.
inline constexpr size_t kAttendFramingBytes = 1024;

// Tokens per stretch of a sequence of n tokens: the least common multiple of the branches'
// segment lengths (each capped at n), itself capped at n; n for block-sparse operators, whose
// patterns span the whole sequence. A stretch starts on a segment boundary of every branch, so
// it is an independent problem of the same operator and its output is exact.
int64_t StretchTokens(const OperatorOptions& options, int64_t n);

namespace internal {
class AttendReactor;
// The checks a stream's header passes before the stream is accepted (model, datatype, shape,
// parameters, and the engine's support for every stretch length); for tests.
absl::Status CheckAttendHeader(const dilattn::v1::Header& header, const ModelRegistry& registry);
// The requests, without data, that a stream with this header enqueues: one for a whole stretch,
// then one for a sequence's shorter last stretch where N is not a multiple of it. What the
// batcher sees of them; for tests.
absl::StatusOr<std::vector<std::unique_ptr<InferenceRequest>>> AttendStretchRequests(
    const dilattn::v1::Header& header, const ModelRegistry& registry);
}  // namespace internal

// Messages are taken as raw bytes (grpc/wire.h): chunk data goes from gRPC's receive buffers
// straight into the stream's lease, and output chunks are sent from the lease without a copy.
class AttendService final : public dilattn::v1::DilatedAttention::WithRawCallbackMethod_Attend<
                                dilattn::v1::DilatedAttention::Service> {
 public:
  // `max_message_bytes`: the server's limit on a message it sends. A stream whose input is not
  // complete and that sends nothing for `idle_timeout` ends with DEADLINE_EXCEEDED, which
  // returns its staging memory (zero: never).
  // Every stream takes a pass from `gate` for its lifetime.
  AttendService(ModelRegistry* registry, StreamMetrics* metrics, RpcGate* gate,
                size_t max_message_bytes, absl::Duration idle_timeout);
  ~AttendService() override;

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Attend(
      grpc::CallbackServerContext* ctx) override;

 private:
  friend class internal::AttendReactor;
  void Register(internal::AttendReactor* r);
  void Unregister(internal::AttendReactor* r);
  void WatchIdleStreams();

  ModelRegistry* registry_;
  StreamMetrics* metrics_;
  RpcGate* gate_;
  size_t max_message_bytes_;
  absl::Duration idle_timeout_;
  absl::Mutex watch_mu_;
  absl::flat_hash_set<internal::AttendReactor*> streams_ ABSL_GUARDED_BY(watch_mu_);
  bool stopping_ ABSL_GUARDED_BY(watch_mu_) = false;
  std::thread watchdog_;
};

}  // namespace dilattn::server
