#pragma once

// Launch parameters of the fused dilated-attention kernel: the operator's plain parameters (with
// device pointers) plus the tile list. No methods, no CUDA types.

#include <cstdint>

#include "kernels/attention/gpu_tiles.h"
#include "kernels/attention/params.h"

namespace dilattn::attention::cuda {

struct FusedForwardParams {
  DilatedAttentionParams attn;  // q, k, v, o and seq_offsets are device pointers
  const GpuTile* tiles;         // device, num_tiles entries, costliest first
  int64_t num_tiles;
  float scale_log2;             // attn.scale * log2(e): scores go straight to exp2
};

}  // namespace dilattn::attention::cuda
