#pragma once

// A model of a step of the wall clock back, for the binary that links wall_clock_shift.cc: that
// file defines gettimeofday and clock_gettime, so that this process reads CLOCK_REALTIME
// `ahead` later than the kernel does (the monotonic clocks are untouched). Every absolute
// wall-clock deadline the process then computes lies `ahead` past the kernel's, which is the
// state of every wait in progress when the clock steps back by `ahead`: a futex wait until a
// wall-clock time (all of Abseil's timed waits here) lasts that much longer.

#include "absl/time/time.h"

namespace dilattn::testing {

class WallClockAhead {
 public:
  explicit WallClockAhead(absl::Duration ahead);
  ~WallClockAhead();
  WallClockAhead(const WallClockAhead&) = delete;
  WallClockAhead& operator=(const WallClockAhead&) = delete;
};

// Whether an Abseil timed wait of this process is stretched by the shift, i.e. whether the
// shift models a step for it (not with an Abseil whose timed waits use a monotonic clock).
bool AbseilWaitsFollowTheWallClock();

}  // namespace dilattn::testing
