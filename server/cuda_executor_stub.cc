// Stand-in for cuda_executor.cc in builds without the CUDA toolkit.

#include "server/executor.h"

namespace dilattn::server {

absl::StatusOr<std::unique_ptr<Executor>> CreateCudaExecutor(const ExecutorOptions&, int) {
  return absl::FailedPreconditionError("this build has no CUDA support");
}

}  // namespace dilattn::server
