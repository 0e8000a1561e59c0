// Stand-in for cuda_executor.cc in builds without the CUDA toolkit.

#include "server/executor.h"

namespace dilattn::server {

absl::StatusOr<std::shared_ptr<memory::BufferPool>> CreatePinnedPool(const ExecutorOptions&) {
  return absl::FailedPreconditionError("this build has no CUDA support");
}

absl::StatusOr<std::unique_ptr<Executor>> CreateCudaExecutor(const ExecutorOptions&, int,
                                                             SharedHostPools) {
  return absl::FailedPreconditionError("this build has no CUDA support");
}

}  // namespace dilattn::server
