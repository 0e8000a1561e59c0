// Stand-in for cuda_ipc.cc in builds without the CUDA toolkit.

#include "server/cuda_ipc.h"

namespace dilattn::server {

absl::StatusOr<void*> CudaIpcOpen(absl::string_view, int, size_t) {
  return absl::FailedPreconditionError(
      "CUDA shared memory is not available: this server was built without CUDA");
}
void CudaIpcClose(void*, int) {}

absl::Status CudaHostPin(void*, size_t, int) {
  return absl::FailedPreconditionError("this server was built without CUDA");
}
void CudaHostUnpin(void*, int) {}

}  // namespace dilattn::server
