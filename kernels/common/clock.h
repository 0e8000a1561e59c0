#pragma once

// The service's deadlines, timeouts and durations run on the monotonic clock, so that a step of
// the wall clock (NTP correcting a VM after a suspend, an operator's `date -s`) neither expires
// queued requests at once nor holds a batch for the length of the step.
//
// They stay absl::Time values, on the steady clock's scale (MonotonicNow()), and never meet
// absl::Now(): a wall-clock instant enters only through MonotonicFromWall (an RPC's deadline).
// No timed Abseil wait is used with them: Debian 12's Abseil (20220623) turns every one, even
// WaitWithTimeout, into a futex wait until an absolute wall-clock time, which a step back
// stretches by the whole step. AwaitUntil and WaitUntil wait without a timeout instead, and one
// thread (internal::Waker) ends the wait at its deadline, sleeping on the monotonic clock
// (std::condition_variable::wait_until on steady_clock, pthread_cond_clockwait).

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace dilattn {

inline absl::Time MonotonicNow() {
  return absl::UnixEpoch() + absl::FromChrono(std::chrono::steady_clock::now().time_since_epoch());
}

// The same instant on the monotonic scale; the infinities stay infinities.
inline absl::Time MonotonicFromWall(absl::Time wall) {
  if (wall == absl::InfiniteFuture() || wall == absl::InfinitePast()) return wall;
  return MonotonicNow() + (wall - absl::Now());
}

namespace internal {

// Ends timed waits at their deadlines. A waiter registers (mu held) before it waits; the waker
// then signals its CondVar, or takes and releases its Mutex, whose release evaluates the
// waiters' conditions (which include the deadline). A waiter that registers and is signalled
// before it sleeps would miss that signal, so a due entry is fired again every kRefire until
// its waiter removes it. The waker's own lock is a std::mutex because only
// std::condition_variable waits on the monotonic clock; it never waits for a waiter's lock
// (TryLock), so the order waiter's lock -> waker's lock cannot deadlock.
class Waker {
 public:
  static constexpr absl::Duration kRefire = absl::Milliseconds(2);

  static Waker& Get() {
    static Waker* const waker = new Waker();  // never destroyed: a wait may end during exit
    return *waker;
  }

  uint64_t Add(absl::Time deadline, absl::CondVar* cv, absl::Mutex* mu) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t id = next_id_++;
    entries_.emplace(id, Entry{deadline, cv, mu});
    if (deadline < next_look_) changed_.notify_one();
    return id;
  }

  void Remove(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.erase(id);
  }

 private:
  struct Entry {
    absl::Time deadline;
    absl::CondVar* cv;  // signalled, or else
    absl::Mutex* mu;    // taken and released
  };

  Waker() {
    std::thread([this] { Run(); }).detach();
  }

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      const absl::Time now = MonotonicNow();
      absl::Time next = absl::InfiniteFuture();
      for (const auto& [id, e] : entries_) {
        if (e.deadline > now) {
          next = std::min(next, e.deadline);
        } else {
          if (e.cv != nullptr) {
            e.cv->SignalAll();
          } else if (e.mu->TryLock()) {
            e.mu->Unlock();
          }
          next = std::min(next, now + kRefire);
        }
      }
      next_look_ = next;
      if (next == absl::InfiniteFuture()) {
        changed_.wait(lock);
      } else {
        changed_.wait_until(lock,
                            std::chrono::steady_clock::time_point(
                                std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    absl::ToChronoNanoseconds(next - absl::UnixEpoch()))));
      }
    }
  }

  std::mutex mu_;
  std::condition_variable changed_;
  std::map<uint64_t, Entry> entries_;
  uint64_t next_id_ = 0;
  absl::Time next_look_ = absl::InfiniteFuture();  // when Run wakes next
};

// Registered with the waker for its lifetime.
class WakeAt {
 public:
  WakeAt(absl::Time deadline, absl::CondVar* cv, absl::Mutex* mu)
      : id_(Waker::Get().Add(deadline, cv, mu)) {}
  ~WakeAt() { Waker::Get().Remove(id_); }
  WakeAt(const WakeAt&) = delete;
  WakeAt& operator=(const WakeAt&) = delete;

 private:
  const uint64_t id_;
};

}  // namespace internal

// Mutex::AwaitWithDeadline on the monotonic scale: true once `cond` holds, false when the
// deadline passed first. `mu` is held.
inline bool AwaitUntil(absl::Mutex& mu, const absl::Condition& cond, absl::Time deadline)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  if (deadline == absl::InfiniteFuture()) {
    mu.Await(cond);
    return true;
  }
  if (MonotonicNow() >= deadline) return cond.Eval();
  auto done = [&] { return cond.Eval() || MonotonicNow() >= deadline; };
  const internal::WakeAt wake(deadline, nullptr, &mu);
  mu.Await(absl::Condition(&done));
  return cond.Eval();
}

// CondVar::WaitWithDeadline on the monotonic scale: true when the deadline has passed. A false
// return may also be a spurious wake-up (the waker signals every waiter of `cv`), which every
// CondVar caller already answers by looking again.
inline bool WaitUntil(absl::CondVar& cv, absl::Mutex* mu, absl::Time deadline)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  if (deadline == absl::InfiniteFuture()) {
    cv.Wait(mu);
    return false;
  }
  if (MonotonicNow() >= deadline) return true;
  const internal::WakeAt wake(deadline, &cv, nullptr);
  cv.Wait(mu);
  return MonotonicNow() >= deadline;
}

}  // namespace dilattn
