#pragma once

// Sequence parallelism (DESIGN.md section 1): one long sequence split across the GPUs of a
// node. GPU g owns queries and outputs [begin_g, end_g), a contiguous slice whose bounds are
// segment boundaries of every branch whose segments fit a slice, so its tiles need only its own
// keys there. A branch whose segments span slices ("spanning") needs keys of other slices: only
// its dilated rows (positions its heads keep, 1/r of them) are exchanged, each GPU sending the
// ones in its slice to every other. This file plans that on the host (pure C++, tested without
// a GPU); kernels/attention/cuda/sequence_parallel.cc runs it with NCCL.

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"

namespace dilattn::attention {

struct SequenceSlicePlan {
  int64_t begin = 0, end = 0;       // query positions owned
  // K and V positions its tiles may read: [begin, end) widened to the whole segments of
  // spanning branches that overlap it (with causal, never past end). The GPU holds K and V over
  // this range only.
  int64_t key_begin = 0, key_end = 0;
  std::vector<GpuTile> tiles;       // tiles of those queries; keyless ones first
  KeylessPlacement keyless;         // {count of keyless tiles, period 1}
  std::vector<int32_t> send_rows;   // (position, head) pairs of K/V rows the others need
};

struct SequenceParallelPlan {
  std::vector<SequenceSlicePlan> slices;  // one per GPU; fewer GPUs than asked if N is short
  std::vector<int> spanning_branches;
  int64_t max_send_rows = 0;               // the most (position, head) rows any slice sends
};

// One sequence (the plan's batch must hold exactly one), `num_gpus` >= 1, tiles of `block_m`
// rows. INVALID_ARGUMENT for more than one sequence.
absl::StatusOr<SequenceParallelPlan> PlanSequenceParallel(const AttentionPlan& plan,
                                                          int num_gpus, int block_m);

}  // namespace dilattn::attention
