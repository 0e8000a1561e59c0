#include "server/grpc/rpc_gate.h"

#include <algorithm>

#include "absl/status/status.h"
#include "kernels/common/clock.h"
#include "kernels/memory/allocator.h"

namespace dilattn::server {

RpcGate::Pass& RpcGate::Pass::operator=(Pass&& other) noexcept {
  if (this != &other) {
    if (gate_ != nullptr) gate_->Leave();
    gate_ = std::exchange(other.gate_, nullptr);
  }
  return *this;
}

RpcGate::Pass::~Pass() {
  if (gate_ != nullptr) gate_->Leave();
}

absl::StatusOr<RpcGate::Pass> RpcGate::Enter() {
  absl::MutexLock lock(&mu_);
  if (draining_) {
    return absl::UnavailableError(
        "server is shutting down; it finishes the requests it has and accepts no new ones");
  }
  ++in_flight_;
  return Pass(this);
}

void RpcGate::Leave() {
  // Its messages, refused or answered, go back to the heap: the engine trims it when idle.
  memory::NoteHeapFreed();
  absl::MutexLock lock(&mu_);
  --in_flight_;
}

int RpcGate::Drain(absl::Time deadline, const std::function<int()>& unfinishable) {
  // `unfinishable` is asked between waits, outside the lock (it takes the engine's).
  const absl::Duration look_every = absl::Milliseconds(100);
  while (true) {
    int running;
    {
      absl::MutexLock lock(&mu_);
      draining_ = true;
      auto idle = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return in_flight_ == 0; };
      AwaitUntil(
          mu_, absl::Condition(&idle),
          unfinishable != nullptr ? std::min(deadline, MonotonicNow() + look_every) : deadline);
      running = in_flight_;
    }
    if (running == 0 || MonotonicNow() >= deadline) return running;
    if (unfinishable != nullptr && running <= unfinishable()) return running;
  }
}

int RpcGate::in_flight() const {
  absl::MutexLock lock(&mu_);
  return in_flight_;
}

}  // namespace dilattn::server
