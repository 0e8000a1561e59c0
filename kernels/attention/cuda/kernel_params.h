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

struct FusedForwardParams {
  DilatedAttentionParams attn;  // q, k, v, o and seq_offsets are device pointers
  const GpuTile* tiles;         // device, num_tiles entries, costliest first
  int64_t num_tiles;
  KeylessPlacement keyless;     // where the tiles whose rows attend to no key (zeros) sit
  float scale_log2;             // attn.scale * log2(e): scores go straight to exp2
  FusedVariant variant;
};

}  // namespace dilattn::attention::cuda
