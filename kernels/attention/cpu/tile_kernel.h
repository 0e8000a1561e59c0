#pragma once

// The CPU path's unit of work: a tile of up to kTileQ kept queries of one (sequence, head,
// branch, segment), run as a small dense attention over that segment's kept keys, kTileK at a
// time, with an online softmax. The same source is compiled once per instruction set
// (tile_kernel_<isa>.cc); cpu_backend.cc picks one at run time.

#include <cstddef>
#include <cstdint>

#include "kernels/attention/params.h"

namespace dilattn::attention::cpu {

inline constexpr int kTileQ = 64;
inline constexpr int kTileK = 64;
// Head dims are padded to this many floats in the tile scratch: the widest vector (AVX-512).
inline constexpr int kDimPad = 16;

struct TileTask {
  int32_t seq;
  int32_t head;
  int32_t branch;
  int32_t q_count;    // queries in this tile, <= kTileQ
  int64_t first_row;  // token row (packed index) of the segment's first kept position
  int64_t n_kept;     // kept positions in the segment
  int64_t q_begin;    // kept index of the tile's first query
};

// The running softmax state of every (token, head) row, kept between the passes of longnet mode:
// acc (tokens, H, D) fp32 unnormalised output, m and l (tokens, H) running max (log2 domain) and
// denominator.
struct RowState {
  float* acc;
  float* m;
  float* l;
};

struct TileContext {
  const DilatedAttentionParams* params;
  RowState state;
  bool fresh;  // the rows start empty instead of from `state`
  bool final;  // write normalised output to params->o instead of back to `state`
};

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
