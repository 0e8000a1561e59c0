#pragma once

// Which keys a query position attends to in one branch, shared verbatim by the host (tile
// planning, tests) and the CUDA kernel, so both sides agree on every span.

#include <cstdint>

#include "kernels/attention/params.h"

#if defined(__CUDACC__)
#define DILATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DILATTN_HOST_DEVICE inline
#endif

namespace dilattn::attention {

// A branch's rate as Int: rates beyond every position (allowed, up to segment lengths that may
// exceed the sequence) act alike, so uint32_t's instance takes them as 2^31 - 1, and int64_t's
// as 2^62, which leaves room for a position plus a rate (BranchKeySpan's count).
template <typename Int>
DILATTN_HOST_DEVICE Int ClampedRate(const DilatedAttentionParams& p, int branch) {
  constexpr int64_t kIntMax = sizeof(Int) >= 8 ? int64_t{1} << 62 : 0x7fffffff;
  const int64_t rate = p.dilation_rate[branch];
  return static_cast<Int>(rate < kIntMax ? rate : kIntMax);
}

// If `head` takes part in `branch`, sets the residue (within a segment, modulo the clamped
// `rate`) of the positions it keeps there. Returns false otherwise.
template <typename Int>
DILATTN_HOST_DEVICE bool BranchHeadOffset(const DilatedAttentionParams& p, int branch, int head,
                                          Int rate, Int* offset) {
  if (p.mode == Mode::kLongNet) {
    *offset = static_cast<Int>(head / p.offset_divisor[branch]);
    return true;
  }
  if (head < p.group_head_begin[branch] || head >= p.group_head_begin[branch + 1]) return false;
  *offset = static_cast<Int>(branch) % rate;
  return true;
}

// The first of first, first + rate, first + 2 rate, ... (rate >= 1) in [lo, hi), if any. Rates
// go up to the largest segment length, so no step may be formed past hi: every intermediate value
// lies between min(first, lo) and hi.
template <typename Int>
DILATTN_HOST_DEVICE bool FirstInRange(Int first, Int rate, Int lo, Int hi, Int* out) {
  Int x = first;
  if (x < lo) {
    const Int steps = (lo - x - 1) / rate + 1;
    if (steps > (hi - x) / rate) return false;
    x += steps * rate;
  }
  if (x >= hi) return false;
  *out = x;
  return true;
}

// If `head` takes part in `branch` and keeps position `pos` (0-based within a sequence of
// `seq_len` tokens), sets the branch's key span for it: positions first, first + stride, ...
// (count of them), the kept positions of pos's segment. Returns false otherwise.
// The host plans in int64_t; the kernel instantiates uint32_t, whose divisions are a few
// instructions where 64-bit ones are a subroutine each, on the start of every CTA's path. Every
// value is a position or length within one sequence (< 2^31 tokens on the GPU path), except
// segment lengths and rates, which are clamped: a segment never exceeds the sequence, and rates
// beyond every position keep one position per segment whatever their value, so both instances
// give the same spans for every sequence the kernel accepts.
template <typename Int = int64_t>
DILATTN_HOST_DEVICE bool BranchKeySpan(const DilatedAttentionParams& p, int branch, int head,
                                       Int seq_len, Int pos, Int* first, Int* count) {
  const Int rate = ClampedRate<Int>(p, branch);
  Int offset;
  if (!BranchHeadOffset<Int>(p, branch, head, rate, &offset)) return false;
  const int64_t segment = p.segment_length[branch];
  const Int w = segment < static_cast<int64_t>(seq_len) ? static_cast<Int>(segment) : seq_len;
  const Int start = pos / w * w;
  if ((pos - start) % rate != offset) return false;
  // first <= pos < end, and every term is below 2^31 for Int = uint32_t: nothing wraps.
  const Int end = start + w < seq_len ? start + w : seq_len;
  *first = start + offset;
  *count = (end - *first + rate - 1) / rate;
  return true;
}

}  // namespace dilattn::attention
