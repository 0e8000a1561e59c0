#pragma once

// What every CUDA backend (dilated, block-sparse) requires of a problem and its tensors, beyond
// its own head dims: fp16 or bf16, sizes and strides within the kernels' 32-bit arithmetic, and
// tensors aligned for their 16-byte loads. INVALID_ARGUMENT naming the value otherwise.

#include "absl/status/status.h"
#include "kernels/attention/attention.h"

namespace dilattn::attention::cuda {

absl::Status CheckCudaProblem(const DilatedAttentionParams& p);
absl::Status CheckCudaTensorAlignment(const AttentionTensors& tensors);

}  // namespace dilattn::attention::cuda
