#include "server/grpc/rpc_gate.h"

#include <optional>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "kernels/common/clock.h"

namespace dilattn::server {
namespace {

TEST(RpcGate, PassesCountWhileHeldAndMovesDoNotDoubleCount) {
  RpcGate gate;
  absl::StatusOr<RpcGate::Pass> a = gate.Enter();
  absl::StatusOr<RpcGate::Pass> b = gate.Enter();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(gate.in_flight(), 2);
  RpcGate::Pass moved = *std::move(a);
  EXPECT_EQ(gate.in_flight(), 2);
  moved = *std::move(b);  // the pass moved over is returned
  EXPECT_EQ(gate.in_flight(), 1);
  moved = RpcGate::Pass();
  EXPECT_EQ(gate.in_flight(), 0);
}

TEST(RpcGate, DrainRefusesNewRpcsAndWaitsForThoseInFlight) {
  RpcGate gate;
  std::optional<RpcGate::Pass> held;
  {
    absl::StatusOr<RpcGate::Pass> pass = gate.Enter();
    ASSERT_TRUE(pass.ok());
    held.emplace(*std::move(pass));
  }
  std::thread finisher([&] {
    absl::SleepFor(absl::Milliseconds(100));
    // Once draining has begun, a new RPC is refused however many are still in flight.
    absl::StatusOr<RpcGate::Pass> late = gate.Enter();
    EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_NE(late.status().message().find("shutting down"), absl::string_view::npos);
    held.reset();
  });
  const absl::Time start = MonotonicNow();
  EXPECT_EQ(gate.Drain(MonotonicNow() + absl::Seconds(30)), 0);
  EXPECT_GE(MonotonicNow() - start, absl::Milliseconds(90));
  finisher.join();
}

TEST(RpcGate, DrainReturnsAtItsDeadlineWithTheCountStillRunning) {
  RpcGate gate;
  absl::StatusOr<RpcGate::Pass> a = gate.Enter();
  absl::StatusOr<RpcGate::Pass> b = gate.Enter();
  ASSERT_TRUE(a.ok() && b.ok());
  const absl::Time start = MonotonicNow();
  EXPECT_EQ(gate.Drain(MonotonicNow() + absl::Milliseconds(50)), 2);
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(10));
}

// A hung GPU's RPCs never finish: the drain ends once only those are left, long before its
// deadline.
TEST(RpcGate, DrainEndsWhenOnlyUnfinishableRpcsAreLeft) {
  RpcGate gate;
  absl::StatusOr<RpcGate::Pass> stuck = gate.Enter();
  std::optional<RpcGate::Pass> held;
  {
    absl::StatusOr<RpcGate::Pass> pass = gate.Enter();
    ASSERT_TRUE(stuck.ok() && pass.ok());
    held.emplace(*std::move(pass));
  }
  std::thread finisher([&] {
    absl::SleepFor(absl::Milliseconds(100));
    held.reset();
  });
  const absl::Time start = MonotonicNow();
  EXPECT_EQ(gate.Drain(MonotonicNow() + absl::Seconds(30), [] { return 1; }), 1);
  const absl::Duration took = MonotonicNow() - start;
  EXPECT_GE(took, absl::Milliseconds(90)) << "the other RPC was waited for";
  EXPECT_LT(took, absl::Seconds(10));
  finisher.join();
}

}  // namespace
}  // namespace dilattn::server
