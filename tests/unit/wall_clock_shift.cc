#include "tests/unit/wall_clock_shift.h"

#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "kernels/common/clock.h"

namespace {

std::atomic<int64_t> ahead_ns{0};

void Shift(struct timespec* ts) {
  const int64_t ns = ahead_ns.load(std::memory_order_relaxed);
  if (ns == 0) return;
  int64_t total = ts->tv_nsec + ns % 1000000000;
  ts->tv_sec += static_cast<time_t>(ns / 1000000000 + total / 1000000000);
  ts->tv_nsec = static_cast<long>(total % 1000000000);
}

}  // namespace

// Through the system calls, not the vDSO: these definitions replace libc's for the whole
// process (Abseil's shared libraries included).
extern "C" int clock_gettime(clockid_t clock, struct timespec* ts) noexcept {
  const long rc = syscall(SYS_clock_gettime, clock, ts);
  if (rc == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) Shift(ts);
  return static_cast<int>(rc);
}

extern "C" int gettimeofday(struct timeval* __restrict tv, void* __restrict tz) noexcept {
  const long rc = syscall(SYS_gettimeofday, tv, tz);
  if (rc == 0) {
    struct timespec ts = {tv->tv_sec, tv->tv_usec * 1000};
    Shift(&ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
  }
  return static_cast<int>(rc);
}

namespace dilattn::testing {

WallClockAhead::WallClockAhead(absl::Duration ahead) {
  ahead_ns.store(absl::ToInt64Nanoseconds(ahead));
}

WallClockAhead::~WallClockAhead() { ahead_ns.store(0); }

bool AbseilWaitsFollowTheWallClock() {
  const WallClockAhead shifted(absl::Seconds(1));
  absl::Mutex mu;
  absl::CondVar cv;
  absl::MutexLock lock(&mu);
  const absl::Time start = MonotonicNow();
  cv.WaitWithTimeout(&mu, absl::Milliseconds(10));
  return MonotonicNow() - start >= absl::Milliseconds(500);
}

}  // namespace dilattn::testing
