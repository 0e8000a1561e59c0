#include "kernels/attention/cuda/staged_upload.h"

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"

namespace dilattn::attention::cuda {

absl::Status CudaErrorStatus(int code, absl::string_view what) {
  const auto err = static_cast<cudaError_t>(code);
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

StagedUpload::~StagedUpload() {
  if (done_ != nullptr) {
    cudaEventSynchronize(static_cast<cudaEvent_t>(done_));
    cudaEventDestroy(static_cast<cudaEvent_t>(done_));
  }
  if (host_ != nullptr) cudaFreeHost(host_);
}

absl::StatusOr<unsigned char*> StagedUpload::Reserve(size_t bytes) {
  // The previous upload reads the buffer asynchronously.
  if (done_ != nullptr) {
    if (absl::Status s = CudaErrorStatus(cudaEventSynchronize(static_cast<cudaEvent_t>(done_)),
                                         "previous upload");
        !s.ok()) {
      return s;
    }
  }
  if (bytes_ < bytes) {
    if (host_ != nullptr) cudaFreeHost(host_);
    host_ = nullptr;
    bytes_ = 0;
    if (absl::Status s = CudaErrorStatus(cudaHostAlloc(&host_, bytes, 0), "pinned staging");
        !s.ok()) {
      return s;
    }
    bytes_ = bytes;
  }
  return static_cast<unsigned char*>(host_);
}

absl::Status StagedUpload::Upload(void* device, size_t bytes, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (bytes > bytes_) {
    return absl::InternalError(
        absl::StrCat("upload of ", bytes, " bytes from ", bytes_, " bytes of staging"));
  }
  if (done_ == nullptr) {
    cudaEvent_t event = nullptr;
    if (absl::Status s =
            CudaErrorStatus(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "event");
        !s.ok()) {
      return s;
    }
    done_ = event;
  }
  if (absl::Status s = CudaErrorStatus(
          cudaMemcpyAsync(device, host_, bytes, cudaMemcpyHostToDevice, stream), "table upload");
      !s.ok()) {
    return s;
  }
  return CudaErrorStatus(cudaEventRecord(static_cast<cudaEvent_t>(done_), stream), "event");
}

}  // namespace dilattn::attention::cuda
