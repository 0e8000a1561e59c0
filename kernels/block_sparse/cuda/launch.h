#pragma once

// Host entry of block-sparse attention on the fused kernels (no CUDA types, as
// kernels/attention/cuda/launch.h).

#include "kernels/attention/cuda/kernel_params.h"

namespace dilattn::block_sparse::cuda {

// Head dims with a compiled block-sparse kernel (the dilated kernel's: 16, 32, 64, 128, 256);
// the variant is attention's one selector (attention::cuda::SelectFusedVariant).
bool BlockSparseSupportsHeadDim(int head_dim);

// Launches over params.tiles with keys from params.key_runs; params.attn gives the tensors,
// strides, dtype (fp16 or bf16), head dim and causal flag.
int LaunchBlockSparseForward(const attention::cuda::FusedForwardParams& params, void* stream);

}  // namespace dilattn::block_sparse::cuda
