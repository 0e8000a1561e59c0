#ifndef DILATTN_SERVER_GRPC_RPC_GATE_H_
#define DILATTN_SERVER_GRPC_RPC_GATE_H_

// The RPCs that carry results (ModelInfer, ModelStreamInfer, Attend) in flight, so that shutdown
// can let them finish before gRPC's own shutdown begins.
//
// Why not simply grpc::Server::Shutdown(deadline) at once: it sends GOAWAY, and a connection
// whose last call ends after GOAWAY is closed by gRPC right then. A client still reading the
// responses of that moment keeps sending frames (window updates, pings); they reach a closed
// socket, the kernel answers with a reset, and the client loses the responses it had not read:
// requests computed and answered fail as UNAVAILABLE. Draining first means every response was
// written before GOAWAY, and the client answers GOAWAY's ping only after reading them.

#include <functional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"

namespace dilattn::server {

class RpcGate {
 public:
  // Held by an RPC's reactor for its lifetime.
  class Pass {
   public:
    Pass() = default;
    Pass(Pass&& other) noexcept : gate_(std::exchange(other.gate_, nullptr)) {}
    Pass& operator=(Pass&& other) noexcept;
    Pass(const Pass&) = delete;
    Pass& operator=(const Pass&) = delete;
    ~Pass();

   private:
    friend class RpcGate;
    explicit Pass(RpcGate* gate) : gate_(gate) {}
    RpcGate* gate_ = nullptr;
  };

  // A pass for a new RPC; UNAVAILABLE once the server drains.
  absl::StatusOr<Pass> Enter();
  // Refuses new RPCs from now on and waits until every pass is returned or `deadline`
  // (monotonic) passes, or no more RPCs run than `unfinishable` (when given) says can never
  // finish: those a hung GPU holds. Returns the number of RPCs still running.
  int Drain(absl::Time deadline, const std::function<int()>& unfinishable = nullptr);
  int in_flight() const;

 private:
  void Leave();

  mutable absl::Mutex mu_;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

// A stream answered with `status` before anything is read (a refused stream).
class RefusedStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit RefusedStream(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace dilattn::server

#endif  // DILATTN_SERVER_GRPC_RPC_GATE_H_
