#include "kernels/common/clock.h"

#include <chrono>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace dilattn {
namespace {

TEST(Clock, MonotonicNowReadsTheSteadyClock) {
  for (int i = 0; i < 1000; ++i) {
    const auto before = std::chrono::steady_clock::now();
    const absl::Time now = MonotonicNow();
    const auto after = std::chrono::steady_clock::now();
    ASSERT_GE(now, absl::UnixEpoch() + absl::FromChrono(before.time_since_epoch()));
    ASSERT_LE(now, absl::UnixEpoch() + absl::FromChrono(after.time_since_epoch()));
  }
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

TEST(Clock, AwaitUntilGivesUpAtItsDeadline) {
  absl::Mutex mu;
  bool flag = false;
  absl::MutexLock lock(&mu);
  const absl::Duration wait = absl::Milliseconds(300);
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
  const absl::Duration wait = absl::Milliseconds(300);
  const absl::Time start = MonotonicNow();
  const absl::Time deadline = start + wait;
  while (true) {
    const absl::Time before = MonotonicNow();
    if (WaitUntil(cv, &mu, deadline)) break;
    // Read before the call, so that a thread descheduled after it returns cannot fail this.
    ASSERT_LT(before, deadline) << "false after the deadline";
  }
  const absl::Duration waited = MonotonicNow() - start;
  EXPECT_GE(waited, wait);
  EXPECT_LT(waited, wait + absl::Seconds(5));
}

TEST(Clock, NoDeadlineWaitsForTheConditionOrASignal) {
  absl::Mutex mu;
  absl::CondVar cv;
  bool flag = false;
  std::thread setter([&] {
    absl::SleepFor(absl::Milliseconds(50));
    absl::MutexLock lock(&mu);
    flag = true;
  });
  {
    absl::MutexLock lock(&mu);
    EXPECT_TRUE(AwaitUntil(mu, absl::Condition(&flag), absl::InfiniteFuture()));
    EXPECT_TRUE(flag);
  }
  setter.join();
  std::thread signaller([&] {
    absl::SleepFor(absl::Milliseconds(50));
    absl::MutexLock lock(&mu);
    flag = false;
    cv.Signal();
  });
  {
    absl::MutexLock lock(&mu);
    while (flag) EXPECT_FALSE(WaitUntil(cv, &mu, absl::InfiniteFuture()));
  }
  signaller.join();
}

// One waker serves every wait: waiters on one CondVar and on one Mutex, with deadlines apart,
// each end at their own.
TEST(Clock, ManyWaitersEndAtTheirOwnDeadlines) {
  absl::Mutex mu;
  absl::CondVar cv;
  bool never = false;
  const absl::Time start = MonotonicNow();
  std::vector<std::thread> threads;
  std::vector<absl::Duration> waited(8);
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      const absl::Time deadline = start + absl::Milliseconds(100 * (i / 2 + 1));
      absl::MutexLock lock(&mu);
      if (i % 2 == 0) {
        while (!WaitUntil(cv, &mu, deadline)) {
        }
      } else {
        EXPECT_FALSE(AwaitUntil(mu, absl::Condition(&never), deadline));
      }
      waited[static_cast<size_t>(i)] = MonotonicNow() - start;
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 8; ++i) {
    const absl::Duration due = absl::Milliseconds(100 * (i / 2 + 1));
    EXPECT_GE(waited[static_cast<size_t>(i)], due) << "waiter " << i;
    EXPECT_LT(waited[static_cast<size_t>(i)], due + absl::Seconds(5)) << "waiter " << i;
  }
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
