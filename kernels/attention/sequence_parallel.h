#pragma once

// Sequence parallelism (DESIGN.md section 1): one long sequence split across the GPUs of a
// node. GPU g owns queries and outputs [begin_g, end_g), a contiguous slice whose bounds are
// segment boundaries of every branch whose segments fit a slice, so its tiles need only its own
// keys there. A branch whose segments span slices ("spanning") needs keys of other slices: only
// its dilated rows (positions its heads keep, 1/r of them) are exchanged, each GPU sending the
// ones in its slice to every other, and each GPU holds them packed (PackedKeys), so that
// its memory for K and V is its slice plus 1/r of the spanning segments it reads. This file plans
// that on the host (pure C++, tested without a GPU); kernels/attention/cuda/
// sequence_parallel_runner.cc runs it with NCCL.

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"

namespace dilattn::attention {

struct SequenceSlicePlan {
  int64_t begin = 0, end = 0;       // query positions owned
  // The GPU's K and V rows, by row position: the slice's own rows at their positions
  // [begin, end), then the packed keys of the spanning branches, up to key_rows_end.
  int64_t key_rows_end = 0;
  std::vector<PackedKeys> packed;   // one per branch: packed for the spanning ones
  std::vector<GpuTile> tiles;       // tiles of those queries; keyless ones first
  KeylessPlacement keyless;         // {count of keyless tiles, period 1}
  // (position, head) pairs of this slice's rows of spanning branches, one entry per branch that
  // keeps the pair: what it sends to every slice, itself included.
  std::vector<int32_t> send_rows;
  // For every slice o (this one included), where o's send_rows go here: (row position, head)
  // pairs in the order of o's send_rows, row position -1 for a row this slice does not read.
  std::vector<std::vector<int32_t>> receive_rows;
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

// The device buffers a run of `sp` over `ranks` GPUs leases on each, in bytes as asked of the
// pools (before they round up; at least 16 each), as SequenceParallelRunner asks for them: K and
// V over the slice and its packed keys, Q and O over the slice; where branches span slices, the
// exchange's send and receive buffers and its row lists; and the tile table, here at most (the
// runner cuts long slices into parts, which can split a tile in two). `sp` as planned, its lists
// still whole; `plan` the one it was planned from. So a caller can tell before a run whether it
// fits the GPUs' pools: the split does not always take less memory per GPU than one GPU does
// (a low-rate branch spanning slices packs its keys on every GPU).
std::vector<std::vector<size_t>> SequenceParallelLeases(const SequenceParallelPlan& sp,
                                                        const AttentionPlan& plan, int ranks);

// The rows [begin, end) of a slice as up to `parts` >= 1 consecutive non-empty ranges (fewer only
// where there are fewer rows than parts), launched in turn (each part's output goes back while
// the next runs). With no spanning branch every key a slice's tiles read lies in the slice; when
// the slice then starts at a multiple of SegmentCutUnit(params, (end - begin) / parts), the
// ranges are cut at multiples of it, so that every key a part's tiles read lies in the part and
// its launch needs only its own inputs (`*by_segments` says which). Otherwise the ranges are
// equal.
std::vector<std::pair<int64_t, int64_t>> SliceParts(const DilatedAttentionParams& params,
                                                    bool spanning, int64_t begin, int64_t end,
                                                    int parts, bool* by_segments);

}  // namespace dilattn::attention
