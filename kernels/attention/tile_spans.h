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

// If `head` takes part in `branch` and keeps position `pos` (0-based within a sequence of
// `seq_len` tokens), sets the branch's key span for it: positions first, first + stride, ...
// (count of them), the kept positions of pos's segment. Returns false otherwise.
DILATTN_HOST_DEVICE bool BranchKeySpan(const DilatedAttentionParams& p, int branch, int head,
                                       int64_t seq_len, int64_t pos, int64_t* first,
                                       int64_t* count) {
  const int64_t rate = p.dilation_rate[branch];
  int64_t offset;
  if (p.mode == Mode::kLongNet) {
    offset = head / p.offset_divisor[branch];
  } else {
    if (head < p.group_head_begin[branch] || head >= p.group_head_begin[branch + 1]) return false;
    offset = branch % rate;
  }
  const int64_t w = p.segment_length[branch] < seq_len ? p.segment_length[branch] : seq_len;
  const int64_t start = pos / w * w;
  if ((pos - start) % rate != offset) return false;
  const int64_t end = start + w < seq_len ? start + w : seq_len;
  *first = start + offset;
  *count = (end - *first + rate - 1) / rate;
  return true;
}

}  // namespace dilattn::attention
