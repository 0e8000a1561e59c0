// Builds without the CUDA toolkit: the GPU multihead path does not exist there.

#include "kernels/multihead/multihead.h"

namespace dilattn::multihead {

absl::StatusOr<std::unique_ptr<MultiheadBackend>> CreateCudaMultiheadBackend(
    const attention::CudaBackendOptions&) {
  return absl::FailedPreconditionError("built without CUDA: no GPU multihead path");
}

}  // namespace dilattn::multihead
