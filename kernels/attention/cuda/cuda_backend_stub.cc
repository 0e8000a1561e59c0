// Stand-in for cuda_backend.cc in builds without the CUDA toolkit.

#include "kernels/attention/attention.h"

namespace dilattn::attention {

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaBackend(const CudaBackendOptions&) {
  return absl::FailedPreconditionError("this build has no CUDA kernels");
}

}  // namespace dilattn::attention
