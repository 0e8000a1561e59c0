#pragma once

// What the CUDA backends (dilated, block-sparse) share on the host. Host compiler only.

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cuda/kernel_params.h"

namespace dilattn::attention::cuda {

// A device the kernels can run on, as the backends name themselves by it ("sm90" on Hopper): the
// minor version tells apart devices of one major (sm_86 from sm_80, sm_89 from both).
struct CudaDeviceArch {
  int major = 0;
  int minor = 0;
  std::string sm() const;  // "sm90"
};

// FAILED_PRECONDITION for a device that does not exist or is older than sm_80, which the kernels
// need; one check for every CUDA backend, so that they accept the same devices.
absl::StatusOr<CudaDeviceArch> UsableCudaDevice(int device);

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
