// Stand-in for cuda_allocator.cc in builds without the CUDA toolkit.

#include "kernels/memory/allocator.h"

namespace dilattn::memory {

int CudaDeviceCount() { return 0; }

absl::StatusOr<std::unique_ptr<Allocator>> NewPinnedHostAllocator() {
  return absl::FailedPreconditionError("this build has no CUDA support: no pinned host memory");
}

absl::StatusOr<std::unique_ptr<Allocator>> NewCudaDeviceAllocator(int) {
  return absl::FailedPreconditionError("this build has no CUDA support: no device memory");
}

}  // namespace dilattn::memory
