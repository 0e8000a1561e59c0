#include "kernels/common/clock.h"

#include <atomic>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace dilattn {
namespace {

TEST(Clock, MonotonicNowNeverGoesBackAndAdvancesWithTime) {
  absl::Time last = MonotonicNow();
  for (int i = 0; i < 10000; ++i) {
    const absl::Time now = MonotonicNow();
    ASSERT_GE(now, last);
    last = now;
  }
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_GE(MonotonicNow() - last, absl::Milliseconds(20));
}

TEST(Clock, AWallInstantKeepsItsDistanceFromNow) {
  const absl::Time mono = MonotonicFromWall(absl::Now() + absl::Seconds(5));
  const absl::Duration ahead = mono - MonotonicNow();
  EXPECT_LE(ahead, absl::Seconds(5));
  EXPECT_GT(ahead, absl::Seconds(4));
  const absl::Duration behind = MonotonicNow() - MonotonicFromWall(absl::Now() - absl::Seconds(3));
  EXPECT_GE(behind, absl::Seconds(3));
  EXPECT_LT(behind, absl::Seconds(4));
  EXPECT_EQ(MonotonicFromWall(absl::InfiniteFuture()), absl::InfiniteFuture());
  EXPECT_EQ(MonotonicFromWall(absl::InfinitePast()), absl::InfinitePast());
}

TEST(Clock, AwaitUntilReturnsOnceTheConditionHolds) {
  absl::Mutex mu;
  bool flag = false;
  std::thread setter([&] {
    absl::SleepFor(absl::Milliseconds(50));
    absl::MutexLock lock(&mu);
    flag = true;
  });
  const absl::Time start = MonotonicNow();
  {
    absl::MutexLock lock(&mu);
    EXPECT_TRUE(AwaitUntil(mu, absl::Condition(&flag), start + absl::Seconds(30)));
  }
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(10));
  setter.join();
}

TEST(Clock, AwaitUntilGivesUpAtItsDeadlineAcrossSlices) {
  absl::Mutex mu;
  bool flag = false;
  absl::MutexLock lock(&mu);
  // Longer than two slices, so that the loop over slices decides when to stop.
  const absl::Duration wait = 2 * kWaitSlice + absl::Milliseconds(100);
  const absl::Time start = MonotonicNow();
  EXPECT_FALSE(AwaitUntil(mu, absl::Condition(&flag), start + wait));
  const absl::Duration waited = MonotonicNow() - start;
  EXPECT_GE(waited, wait);
  EXPECT_LT(waited, wait + absl::Seconds(5));
  // A deadline already past only looks at the condition.
  EXPECT_FALSE(AwaitUntil(mu, absl::Condition(&flag), absl::InfinitePast()));
  flag = true;
  EXPECT_TRUE(AwaitUntil(mu, absl::Condition(&flag), absl::InfinitePast()));
}

TEST(Clock, WaitUntilReportsItsDeadlineOnlyOnceItHasPassed) {
  absl::Mutex mu;
  absl::CondVar cv;
  absl::MutexLock lock(&mu);
  EXPECT_TRUE(WaitUntil(cv, &mu, MonotonicNow() - absl::Milliseconds(1)));
  EXPECT_TRUE(WaitUntil(cv, &mu, absl::InfinitePast()));
  const absl::Duration wait = 2 * kWaitSlice + absl::Milliseconds(100);
  const absl::Time start = MonotonicNow();
  const absl::Time deadline = start + wait;
  while (!WaitUntil(cv, &mu, deadline)) {
    ASSERT_LT(MonotonicNow(), deadline) << "a false return after the deadline";
  }
  const absl::Duration waited = MonotonicNow() - start;
  EXPECT_GE(waited, wait);
  EXPECT_LT(waited, wait + absl::Seconds(5));
}

// What bounds the effect of a wall-clock step: no single wait outlasts a slice by much, however
// far its deadline.
TEST(Clock, ALongWaitReturnsAfterASlice) {
  absl::Mutex mu;
  absl::CondVar cv;
  absl::MutexLock lock(&mu);
  const absl::Time start = MonotonicNow();
  EXPECT_FALSE(WaitUntil(cv, &mu, start + absl::Seconds(60)));
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(10));
}

TEST(Clock, WaitUntilWakesOnASignal) {
  absl::Mutex mu;
  absl::CondVar cv;
  bool flag = false;
  std::thread signaller([&] {
    absl::SleepFor(absl::Milliseconds(50));
    absl::MutexLock lock(&mu);
    flag = true;
    cv.Signal();
  });
  const absl::Time start = MonotonicNow();
  {
    absl::MutexLock lock(&mu);
    while (!flag) ASSERT_FALSE(WaitUntil(cv, &mu, start + absl::Seconds(30)));
  }
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(10));
  signaller.join();
}

}  // namespace
}  // namespace dilattn
