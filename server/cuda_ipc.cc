#include "server/cuda_ipc.h"

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace dilattn::server {
namespace {

std::string Describe(cudaError_t err) {
  return absl::StrCat(cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

// The extent of the allocation holding `p`, from the driver: the runtime does not say it. Looked
// up through the runtime so that the binary does not link libcuda and still starts on machines
// without a driver.
CUresult AllocationRange(void* p, CUdeviceptr* base, size_t* size) {
  static PFN_cuMemGetAddressRange_v3020 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(f);
  }();
  if (fn == nullptr) return CUDA_ERROR_NOT_FOUND;
  return fn(base, size, reinterpret_cast<CUdeviceptr>(p));
}

}  // namespace

absl::StatusOr<void*> CudaIpcOpen(absl::string_view raw_handle, int device, size_t byte_size) {
  cudaIpcMemHandle_t handle;
  if (raw_handle.size() != sizeof(handle)) {
    return absl::InvalidArgumentError(absl::StrCat("raw_handle has ", raw_handle.size(),
                                                   " bytes; a cudaIpcMemHandle_t has ",
                                                   sizeof(handle)));
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    count = 0;
  }
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("device_id ", device, " does not exist here (", count, " CUDA devices)"));
  }
  std::memcpy(&handle, raw_handle.data(), sizeof(handle));
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  void* pointer = nullptr;
  const cudaError_t err =
      cudaIpcOpenMemHandle(&pointer, handle, cudaIpcMemLazyEnablePeerAccess);
  CUdeviceptr base = 0;
  size_t size = 0;
  const CUresult range =
      err == cudaSuccess ? AllocationRange(pointer, &base, &size) : CUDA_ERROR_INVALID_VALUE;
  cudaSetDevice(previous);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InvalidArgumentError(
        absl::StrCat("cannot open the CUDA IPC handle on device ", device, ": ", Describe(err)));
  }
  const size_t available =
      range == CUDA_SUCCESS ? base + size - reinterpret_cast<CUdeviceptr>(pointer) : 0;
  if (range != CUDA_SUCCESS || available < byte_size) {
    CudaIpcClose(pointer, device);
    if (range != CUDA_SUCCESS) {
      return absl::InternalError("cannot query the extent of the CUDA IPC allocation");
    }
    return absl::InvalidArgumentError(absl::StrCat("byte_size ", byte_size,
                                                   " exceeds the shared CUDA allocation (",
                                                   available, " bytes)"));
  }
  return pointer;
}

void CudaIpcClose(void* device_pointer, int device) {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaIpcCloseMemHandle(device_pointer);
  cudaGetLastError();
  cudaSetDevice(previous);
}

absl::Status CudaHostPin(void* data, size_t bytes, int device) {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  const cudaError_t err = cudaHostRegister(data, bytes, cudaHostRegisterPortable);
  cudaSetDevice(previous);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(absl::StrCat("cudaHostRegister: ", Describe(err)));
  }
  return absl::OkStatus();
}

void CudaHostUnpin(void* data, int device) {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaHostUnregister(data);
  cudaGetLastError();
  cudaSetDevice(previous);
}

}  // namespace dilattn::server
