#pragma once

// The service's deadlines, timeouts and durations run on the monotonic clock, so that a step of
// the wall clock (NTP correcting a VM after a suspend, an operator's `date -s`) neither expires
// queued requests at once nor holds a batch for the length of the step.
//
// They stay absl::Time values, on the steady clock's scale (MonotonicNow()), and never meet
// absl::Now(): a wall-clock instant enters only through MonotonicFromWall (an RPC's deadline).
// Debian 12's Abseil (20220623) turns every timed wait into an absolute wall-clock futex wait,
// even WaitWithTimeout, so a step during one wait would still stretch it by the step; the waits
// below wait in slices of at most kWaitSlice and look at the monotonic clock after each, which
// bounds what a step can add to kWaitSlice.

#include <algorithm>
#include <chrono>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace dilattn {

inline constexpr absl::Duration kWaitSlice = absl::Milliseconds(250);

inline absl::Time MonotonicNow() {
  return absl::UnixEpoch() + absl::FromChrono(std::chrono::steady_clock::now().time_since_epoch());
}

// The same instant on the monotonic scale; the infinities stay infinities.
inline absl::Time MonotonicFromWall(absl::Time wall) {
  if (wall == absl::InfiniteFuture() || wall == absl::InfinitePast()) return wall;
  return MonotonicNow() + (wall - absl::Now());
}

// Mutex::AwaitWithDeadline on the monotonic scale: true once `cond` holds, false when the
// deadline passed first. `mu` is held.
inline bool AwaitUntil(absl::Mutex& mu, const absl::Condition& cond, absl::Time deadline)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  if (deadline == absl::InfiniteFuture()) {
    mu.Await(cond);
    return true;
  }
  while (true) {
    const absl::Duration left = deadline - MonotonicNow();
    if (left <= absl::ZeroDuration()) return cond.Eval();
    if (mu.AwaitWithTimeout(cond, std::min(left, kWaitSlice))) return true;
  }
}

// CondVar::WaitWithDeadline on the monotonic scale: true when the deadline has passed. It may
// also return false without a signal (after a slice), which every CondVar caller already takes
// as a spurious wake-up and answers by looking again.
inline bool WaitUntil(absl::CondVar& cv, absl::Mutex* mu, absl::Time deadline)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  if (deadline == absl::InfiniteFuture()) {
    cv.Wait(mu);
    return false;
  }
  const absl::Duration left = deadline - MonotonicNow();
  if (left <= absl::ZeroDuration()) return true;
  cv.WaitWithTimeout(mu, std::min(left, kWaitSlice));
  return MonotonicNow() >= deadline;
}

}  // namespace dilattn
