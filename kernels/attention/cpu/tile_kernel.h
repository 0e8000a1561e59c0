#pragma once

// The CPU path's unit of work: a tile of up to kTileQ queries of one head, evenly spaced in
// the packed token rows, attending to keys given as spans of evenly spaced rows, kTileK keys at a
// time, with an online softmax. Dilated attention makes one tile per (sequence, head, branch,
// segment, 64 kept queries) with one span (the segment's kept keys); block-sparse attention makes
// one per (sequence, head, query block) with a span per selected key block. The same source is
// compiled once per instruction set (tile_kernel_<isa>.cc); the backend picks one at run time.

#include <cstddef>
#include <cstdint>

#include "kernels/attention/params.h"

namespace dilattn::attention::cpu {

inline constexpr int kTileQ = 64;
inline constexpr int kTileK = 64;
// Head dims are padded to this many floats in the tile scratch: the widest vector (AVX-512).
inline constexpr int kDimPad = 16;

// Keys at packed token rows first_row, first_row + stride, ... (count of them).
struct KeySpan {
  int64_t first_row;
  int64_t count;
};

struct TileTask {
  int64_t q_first_row;  // packed token row of the tile's first query
  int64_t stride;       // rows between consecutive queries, and between keys of a span
  int32_t head;
  int32_t q_count;      // queries in this tile, <= kTileQ
  int32_t span_begin;   // the tile's key spans: TileContext::spans[span_begin, + span_count)
  int32_t span_count;
};

// The running softmax state of every (token, head) row, kept between the passes of longnet mode:
// acc (tokens, H, D) fp32 unnormalised output, m and l (tokens, H) running max (log2 domain) and
// denominator.
struct RowState {
  float* acc;
  float* m;
  float* l;
};

// What every tile of a call shares: the tensors and the softmax options.
struct TileParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_row_stride;  // elements between consecutive token rows
  int64_t k_row_stride;
  int64_t v_row_stride;
  int64_t o_row_stride;
  int32_t num_heads;
  int32_t head_dim;
  DType dtype;
  bool causal;
  float scale;
};

struct TileContext {
  const TileParams* params;
  const KeySpan* spans;
  RowState state;
  bool fresh;  // the rows start empty instead of from `state`
  bool final;  // write normalised output to params->o instead of back to `state`
};
// With causal, a key at a packed row after the query's row is masked. Rows of one sequence are
// consecutive, so row order is position order; a tile never mixes sequences.

// Floats of per-worker scratch a tile needs for this head dim.
constexpr size_t TileScratchFloats(int head_dim) {
  const size_t dim = (static_cast<size_t>(head_dim) + kDimPad - 1) / kDimPad * kDimPad;
  // Q, K^T, V, S, acc tiles and two row vectors.
  return kTileQ * dim + dim * kTileK + kTileK * dim + kTileQ * kTileK + kTileQ * dim + 2 * kTileQ;
}

using TileFn = void (*)(const TileContext& ctx, const TileTask& task, float* scratch);

TileFn GenericTileKernel();
#if defined(__x86_64__)
TileFn Avx2TileKernel();
TileFn Avx512TileKernel();
#endif

}  // namespace dilattn::attention::cpu
