// The waits that the service's deadlines end, under a model of the wall clock stepping back
// (wall_clock_shift.h): each must end at its deadline on the monotonic clock, where a timed
// Abseil wait would last the step longer.

#include <memory>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "kernels/common/clock.h"
#include "kernels/memory/allocator.h"
#include "kernels/memory/buffer_pool.h"
#include "tests/unit/wall_clock_shift.h"

namespace dilattn {
namespace {

constexpr absl::Duration kStep = absl::Milliseconds(2500);
constexpr absl::Duration kWait = absl::Milliseconds(200);
// Room for a loaded machine (the sanitizer stages), well short of the step.
constexpr absl::Duration kSlack = absl::Milliseconds(1500);

class WallClockStepBack : public ::testing::Test {
 protected:
  void SetUp() override {
    static const bool modelled = testing::AbseilWaitsFollowTheWallClock();
    if (!modelled) {
      GTEST_SKIP() << "this Abseil's timed waits do not follow the wall clock, so a step "
                      "cannot be modelled here (nor stretch them)";
    }
  }

  static void ExpectEndedOnTime(absl::Time start) {
    const absl::Duration waited = MonotonicNow() - start;
    EXPECT_GE(waited, kWait);
    EXPECT_LT(waited, kWait + kSlack) << "the wait lasted the step";
  }
};

TEST_F(WallClockStepBack, AbseilsOwnTimedWaitLastsTheStep) {
  const testing::WallClockAhead step(kStep);
  absl::Mutex mu;
  absl::CondVar cv;
  absl::MutexLock lock(&mu);
  const absl::Time start = MonotonicNow();
  cv.WaitWithTimeout(&mu, kWait);
  EXPECT_GE(MonotonicNow() - start, kStep) << "the model of the step does not hold";
}

TEST_F(WallClockStepBack, AwaitUntilEndsAtItsDeadline) {
  const testing::WallClockAhead step(kStep);
  absl::Mutex mu;
  bool flag = false;
  absl::MutexLock lock(&mu);
  const absl::Time start = MonotonicNow();
  EXPECT_FALSE(AwaitUntil(mu, absl::Condition(&flag), start + kWait));
  ExpectEndedOnTime(start);
}

TEST_F(WallClockStepBack, WaitUntilEndsAtItsDeadline) {
  const testing::WallClockAhead step(kStep);
  absl::Mutex mu;
  absl::CondVar cv;
  absl::MutexLock lock(&mu);
  const absl::Time start = MonotonicNow();
  while (!WaitUntil(cv, &mu, start + kWait)) {
  }
  ExpectEndedOnTime(start);
}

TEST_F(WallClockStepBack, APoolWaitEndsAtItsDeadline) {
  auto pool = memory::BufferPool::Create({"step", 4096}, memory::NewHostAllocator());
  ASSERT_TRUE(pool.ok());
  absl::StatusOr<memory::Buffer> held = (*pool)->Acquire(4096);
  ASSERT_TRUE(held.ok());
  const testing::WallClockAhead step(kStep);
  const absl::Time start = MonotonicNow();
  absl::StatusOr<memory::Buffer> late = (*pool)->Acquire(4096, start + kWait);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kResourceExhausted) << late.status();
  ExpectEndedOnTime(start);
}

}  // namespace
}  // namespace dilattn
