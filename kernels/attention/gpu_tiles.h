#pragma once

// The work list of the fused GPU kernel. Positions of one (sequence, head) are grouped so that
// every group shares one key set: within a cell (a stretch where no branch's segment boundary
// falls), which branches keep a position, and so its key set, depends only on its residue modulo
// M = lcm of the branches' rates. Residues with equal key sets are merged into the widest
// progressions a0 + d k (d dividing M), so a tile of up to block_m positions spaced by d spans as
// little of the cell as it can (with causal, a tile computes keys up to its last row). A branch
// whose rate exceeds the cell, or one that keeps so few of its positions that the kernel's walks
// cost less that way, has its positions cut out of their progressions as tiles of their own. The
// kernel runs one online softmax per tile over the union of its branches' key spans. Each
// (position, head) lies in exactly one tile, so the output is written once, with no merge pass
// and no per-branch temporaries. Pure C++: planned on the host, tested without a GPU.

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/tile_spans.h"

namespace dilattn::attention {

struct GpuTile {
  int32_t seq;       // sequence index
  int32_t q_pos;     // position of the first query within the sequence
  int32_t q_stride;  // positions between consecutive queries
  int16_t head;
  int16_t count;     // queries in the tile, 1..block_m (1..KeylessTileRows for keyless)
};
static_assert(sizeof(GpuTile) == 16, "one 16-byte load per tile");

// Positions that attend to no key (head_groups positions that no branch keeps) get zeros: their
// tiles are up to this many rows, as only zeros are written for them. Within the int16 count.
constexpr int KeylessTileRows(int block_m) { return block_m <= 2047 ? 16 * block_m : 32767; }

// Largest sequence, head count and tile height the tile fields can describe.
inline constexpr int64_t kGpuMaxSeqLen = (int64_t{1} << 31) - 1;
inline constexpr int64_t kGpuMaxHeads = 32767;

// Number of tiles BuildGpuTiles makes, without making them.
int64_t CountGpuTiles(const AttentionPlan& plan, int block_m);

// Where the tiles whose positions attend to no key sit in the list: the j-th of them (j < count)
// at index j * period. The kernel only writes their zeros, deciding so from its block index.
struct KeylessPlacement {
  int64_t count = 0;
  int64_t period = 1;
};

// Sequence parallelism (sequence_parallel.h): a GPU may hold the keys of a branch whose segments
// span GPUs packed, only the rows its heads keep, instead of at their positions. Key j of that
// branch's segment starting at origin + s * w (w its segment length, clamped to the sequence) is
// then K/V row position begin + s * per_segment + j, which the kernel reads; masks still use the
// key's own position. begin < 0 (the default): the branch's keys are read at their positions.
struct PackedKeys {
  int32_t begin = -1;
  int32_t origin = 0;
  int32_t per_segment = 0;
};

// The K/V row position of the first key of the packed segment that starts at `segment_start`
// (a multiple of the branch's clamped segment length `w`, at or after `packed.origin`). The
// sequence-parallel planner (int64_t) places the exchanged rows by it and the kernel (uint32_t)
// reads them by it.
template <typename Int>
DILATTN_HOST_DEVICE Int PackedSegmentRow(const PackedKeys& packed, Int segment_start, Int w) {
  return static_cast<Int>(packed.begin) + (segment_start - static_cast<Int>(packed.origin)) / w *
                                              static_cast<Int>(packed.per_segment);
}

// Whether list entry `index` is a keyless tile. The kernel instantiates uint32_t (its block
// index; the launch checks that the period fits), whose division is a few instructions.
template <typename Int = int64_t>
DILATTN_HOST_DEVICE bool IsKeylessSlot(const KeylessPlacement& keyless, Int index) {
  const auto period = static_cast<Int>(keyless.period);
  return index % period == 0 && index / period < keyless.count;
}

// Fills `tiles` for every (sequence, head) of the plan, costliest first (by an estimate of
// queries x visible keys), so that a grid walking the list in order ends on short tiles. Keyless
// tiles are spread evenly over the list's first half (*keyless, if not null, says where): their
// CTAs write zeros, bound by memory, while the CTAs beside them on an SM compute, and none is
// left for the tail.
absl::Status BuildGpuTiles(const AttentionPlan& plan, int block_m, std::vector<GpuTile>* tiles,
                           KeylessPlacement* keyless = nullptr);

// The tile lists of recently seen problems, so that a shape that comes back (steady serving
// traffic: the same few batch compositions again and again) is not planned on the host again:
// BuildGpuTiles costs tens of microseconds even for a batch of short sequences, a good part of a
// small batch's host time. Least recently used lists go first. Thread-safe; one per device is
// shared by that device's backends.
class GpuTileCache {
 public:
  struct List {
    std::vector<GpuTile> tiles;
    KeylessPlacement keyless;
  };
  struct Stats {
    uint64_t hits = 0, misses = 0;
    size_t entries = 0, bytes = 0;  // kept now
  };
  // Keeps at most `max_entries` lists and `max_bytes` of tiles; a list larger than that is built
  // and returned but not kept.
  explicit GpuTileCache(size_t max_entries = 64, size_t max_bytes = size_t{64} << 20);

  // The list of `plan` at tile height `block_m` (BuildGpuTiles), kept under `key`, which must
  // determine it: a fingerprint of the plan's parameters and sequence offsets. Lists are built
  // outside the lock, so threads asking for different shapes do not wait for each other.
  absl::StatusOr<std::shared_ptr<const List>> Get(const std::string& key, const AttentionPlan& plan,
                                                  int block_m);
  Stats stats() const;
  // Drops every kept list (an idle server's release); returns their bytes.
  size_t Clear();

 private:
  using Entry = std::pair<std::string, std::shared_ptr<const List>>;
  const size_t max_entries_, max_bytes_;
  mutable absl::Mutex mu_;
  std::list<Entry> lru_ ABSL_GUARDED_BY(mu_);  // most recently used first
  std::unordered_map<std::string, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);  // entries: lru_.size(), filled in by stats()
};

// A tile list cut into launches over parts of the query rows, for callers that overlap copies
// with them: part i takes the tiles whose first row (seq_offsets[seq] + q_pos) lies in
// [cuts[i], cuts[i + 1]), its keyless tiles first (it launches with KeylessPlacement{keyless, 1})
// and then the rest in the list's order, so that after part i every output row below cuts[i + 1]
// is written. Part i reads Q only below its q_end, which ascends and is at least cuts[i + 1].
// `cuts` ascend; rows outside [cuts.front(), cuts.back()) go to the first or last part.
struct TilePart {
  int64_t tile_begin;  // into *parted
  int64_t num_tiles;
  int64_t keyless;
  int64_t q_end;
};
std::vector<TilePart> CutTilesIntoParts(const std::vector<GpuTile>& tiles,
                                        const KeylessPlacement& keyless,
                                        const std::vector<int64_t>& seq_offsets,
                                        const std::vector<int64_t>& cuts,
                                        std::vector<GpuTile>* parted);

}  // namespace dilattn::attention
