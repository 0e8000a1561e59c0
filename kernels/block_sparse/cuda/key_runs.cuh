#pragma once

// Block-sparse attention on the fused kernels: a tile's keys are its query block's runs of
// selected key blocks (KeyRunTables, planned on the host by BuildBlockSparseGpuWork), walked as
// the kernels walk branch spans. Every run but the last is read from global memory when the walk
// reaches it; the last, the only one that can reach the tile's rows with causal, is clipped to
// the tile's last row and split after the first warpgroup's rows, as PlanKeySpans splits branch
// spans, and kept in shared memory.

#include <cstdint>

#include "kernels/attention/cuda/fused_forward.cuh"

namespace dilattn::block_sparse::cuda {

using attention::cuda::kBlockN;
using attention::cuda::KeyRun;
using attention::cuda::KeyRunRow;
using attention::cuda::KeyTile;

struct KeyRunSpans {
  const KeyRun* lead;  // the runs before the last, global memory
  int num_lead;
  int tail_first[2];  // the last run: keys up to the split row's, then the rest
  int tail_count[2];
  int num;  // num_lead plus the last run's non-empty parts
  int split_tiles;
  int total;
  __device__ int total_tiles() const { return total; }
};

__device__ __forceinline__ KeyTile SpanStart(const KeyRunSpans& spans, int span) {
  KeyTile kt{span, 0, 0, 1, 0, 1};
  if (span < spans.num_lead) {
    const int2 run = __ldg(reinterpret_cast<const int2*>(spans.lead + span));
    kt.pos0 = run.x;
    kt.remaining = run.y;
  } else if (span < spans.num) {
    kt.pos0 = spans.tail_first[span - spans.num_lead];
    kt.remaining = spans.tail_count[span - spans.num_lead];
  }
  kt.row0 = kt.pos0;
  return kt;
}

// Thread 0 reads the tile's row and its last run; every thread waits for the table. q_first,
// q_split and q_last are positions of the tile's first row, of the last row of its first
// `split_rows`, and of its last row (rows are consecutive positions).
template <typename Gather>
__device__ __forceinline__ void PlanTileSpans(const Gather& gather, KeyRunSpans* spans,
                                              int split_rows) {
  if (threadIdx.x == 0) {
    const attention::cuda::KeyRunTables& tables = gather.params.key_runs;
    const KeyRunRow row = tables.rows[tables.tile_row[blockIdx.x]];
    const int count_rows = gather.tile.count;
    const int q_split = gather.tile.q_pos + (split_rows < count_rows ? split_rows : count_rows) - 1;
    const int q_last = gather.tile.q_pos + count_rows - 1;
    int num_lead = 0, lead_tiles = 0, head = 0, tail = 0, first = 0;
    if (row.num_runs > 0) {
      num_lead = row.num_runs - 1;
      lead_tiles = row.lead_tiles;
      const KeyRun last = tables.runs[row.run_begin + num_lead];
      first = last.first;
      int count = last.count;
      head = count;
      if (gather.p.causal) {
        // Keys after the last row are masked for every row; those after the split row only
        // for the second warpgroup, whose walk alone goes on past them.
        const int visible = q_last - first + 1;
        count = visible < 0 ? 0 : (visible < count ? visible : count);
        const int to_split = q_split - first + 1;
        const int split_keys = to_split <= 0 ? 0 : (to_split + kBlockN - 1) / kBlockN * kBlockN;
        head = split_keys < count ? split_keys : count;
      }
      tail = count - head;
    }
    spans->lead = tables.runs + row.run_begin;
    spans->num_lead = num_lead;
    int parts = 0;
    if (head > 0) {
      spans->tail_first[parts] = first;
      spans->tail_count[parts] = head;
      ++parts;
    }
    if (tail > 0) {
      spans->tail_first[parts] = first + head;
      spans->tail_count[parts] = tail;
      ++parts;
    }
    spans->num = num_lead + parts;
    spans->split_tiles = lead_tiles + (head + kBlockN - 1) / kBlockN;
    spans->total = spans->split_tiles + (tail + kBlockN - 1) / kBlockN;
  }
  __syncthreads();
}

}  // namespace dilattn::block_sparse::cuda
