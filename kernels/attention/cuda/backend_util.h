#pragma once

// What the CUDA backends (dilated, block-sparse) share on the host. Host compiler only.

#include <string>

#include "absl/status/status.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cuda/kernel_params.h"

namespace dilattn::attention::cuda {

// What every CUDA backend requires of a problem and its tensors beyond its own head dims: fp16
// or bf16, sizes and strides within the kernels' 32-bit arithmetic, and tensors aligned for
// their 16-byte loads. INVALID_ARGUMENT naming the value otherwise.
absl::Status CheckCudaProblem(const DilatedAttentionParams& p);
absl::Status CheckCudaTensorAlignment(const AttentionTensors& tensors);

// The bytes that decide a plan's tile lists: its parameters without their pointers, and its
// sequence offsets. Backends plan a shape once and reuse the lists while this stays the same.
std::string PlanFingerprint(const AttentionPlan& plan);

// Launch parameters for `p` over `tensors`: the device pointers, the sequence offsets uploaded
// to `seq_offsets` and the scale in the exponent's base; the caller adds the tile list.
FusedForwardParams BindFusedParams(const DilatedAttentionParams& p,
                                   const AttentionTensors& tensors, const void* seq_offsets);

}  // namespace dilattn::attention::cuda
