// Stand-in for sequence_parallel_runner.cc in builds without CUDA or NCCL.

#include "kernels/attention/cuda/sequence_parallel_runner.h"

namespace dilattn::attention::cuda {

absl::StatusOr<std::unique_ptr<SequenceParallelRunner>> SequenceParallelRunner::Create(
    std::vector<int>, size_t) {
  return absl::FailedPreconditionError("this build has no CUDA or no NCCL");
}

}  // namespace dilattn::attention::cuda
