// Builds without the CUDA toolkit: no GPU block-sparse backend.

#include "kernels/block_sparse/block_sparse.h"

namespace dilattn::block_sparse {

absl::StatusOr<std::unique_ptr<BlockSparseBackend>> CreateCudaBlockSparseBackend(
    const attention::CudaBackendOptions&) {
  return absl::FailedPreconditionError("this build has no CUDA support");
}

}  // namespace dilattn::block_sparse
