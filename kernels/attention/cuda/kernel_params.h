#pragma once

// Launch parameters of the fused dilated-attention kernel: the operator's plain parameters (with
// device pointers) plus the tile list. No methods, no CUDA types.

#include <cstdint>

#include "kernels/attention/gpu_tiles.h"
#include "kernels/attention/params.h"

namespace dilattn::attention::cuda {

// Which implementation of the fused kernel runs: mma.sync (sm_80 and newer, every head dim) or
// wgmma (sm_90a, D = 64 and 128).
enum class FusedVariant : int32_t { kMmaSync = 0, kWgmma = 1 };

// Block-sparse attention (kernels/block_sparse/cuda) runs the same kernels over tiles whose keys
// are contiguous runs (selected key blocks, adjacent ones merged) read from tables instead of
// branch spans planned on the device. A run is keys first .. first + count - 1 of the tile's
// sequence. Every tile's rows lie in one query block, whose runs are ascending: with causal,
// only the last can reach the tile's rows.
struct KeyRun {
  int32_t first;
  int32_t count;
};
struct KeyRunRow {
  int32_t run_begin;  // into the run table
  int32_t num_runs;
  int32_t lead_tiles;  // 64-key tiles of every run but the last
  int32_t reserved;
};
struct KeyRunTables {
  const int32_t* tile_row;  // device, per tile: its query block's row
  const KeyRunRow* rows;    // device
  const KeyRun* runs;       // device
};

struct FusedForwardParams {
  DilatedAttentionParams attn;  // q, k, v, o and seq_offsets are device pointers
  const GpuTile* tiles;         // device, num_tiles entries, costliest first
  int64_t num_tiles;
  KeylessPlacement keyless;     // where the tiles whose rows attend to no key (zeros) sit
  float scale_log2;             // attn.scale * log2(e): scores go straight to exp2
  FusedVariant variant;
  KeyRunTables key_runs;  // block-sparse only (null otherwise)
  PackedKeys packed[kMaxBranches];  // (gpu_tiles.h) all unpacked but in sequence-parallel runs
};

}  // namespace dilattn::attention::cuda
