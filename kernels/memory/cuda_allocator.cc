// CUDA-backed allocators. Built only when the CUDA toolkit is found; cuda_allocator_stub.cc
// stands in otherwise. Host compiler only: the runtime API needs no device code.

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "kernels/memory/allocator.h"

namespace dilattn::memory {
namespace {

absl::Status CudaError(cudaError_t err, absl::string_view what, size_t bytes) {
  const std::string message = absl::StrCat(what, " of ", bytes, " bytes failed: ",
                                           cudaGetErrorName(err), " (", cudaGetErrorString(err),
                                           ")");
  if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

class PinnedHostAllocator final : public Allocator {
 public:
  DeviceLoc location() const override { return DeviceLoc::Host(); }
  std::string name() const override { return "pinned-host"; }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky non-fatal error so later calls are unaffected
      return CudaError(err, "cudaHostAlloc", bytes);
    }
    return p;
  }
  void Free(void* ptr, size_t) override { cudaFreeHost(ptr); }
};

class CudaDeviceAllocator final : public Allocator {
 public:
  explicit CudaDeviceAllocator(int device) : device_(device) {}
  DeviceLoc location() const override { return DeviceLoc::Cuda(device_); }
  std::string name() const override { return absl::StrCat("cuda:", device_); }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (cudaError_t err = cudaSetDevice(device_); err != cudaSuccess) {
      return CudaError(err, "cudaSetDevice before cudaMalloc", bytes);
    }
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return CudaError(err, "cudaMalloc", bytes);
    }
    return p;
  }
  void Free(void* ptr, size_t) override {
    cudaSetDevice(device_);
    cudaFree(ptr);
  }

 private:
  int device_;
};

}  // namespace

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

absl::StatusOr<std::unique_ptr<Allocator>> NewPinnedHostAllocator() {
  if (CudaDeviceCount() == 0) {
    return absl::FailedPreconditionError("pinned host memory needs a CUDA device; none found");
  }
  return std::unique_ptr<Allocator>(new PinnedHostAllocator());
}

absl::StatusOr<std::unique_ptr<Allocator>> NewCudaDeviceAllocator(int device) {
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", device, " does not exist (", count, " devices found)"));
  }
  return std::unique_ptr<Allocator>(new CudaDeviceAllocator(device));
}

}  // namespace dilattn::memory
