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

// Makes `device` current for the scope's lifetime and then restores the caller's device: these
// calls run on gRPC and engine threads whose current device is not ours to change.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaGetDevice(&previous_);
    cudaSetDevice(device);
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

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
  DeviceScope scope(device);
  void* pointer = nullptr;
  const cudaError_t err =
      cudaIpcOpenMemHandle(&pointer, handle, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InvalidArgumentError(
        absl::StrCat("cannot open the CUDA IPC handle on device ", device, ": ", Describe(err)));
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  const CUresult range = AllocationRange(pointer, &base, &size);
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
  DeviceScope scope(device);
  cudaIpcCloseMemHandle(device_pointer);
  cudaGetLastError();
}

absl::Status CudaHostPin(void* data, size_t bytes, int device) {
  DeviceScope scope(device);
  const cudaError_t err = cudaHostRegister(data, bytes, cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(absl::StrCat("cudaHostRegister: ", Describe(err)));
  }
  return absl::OkStatus();
}

void CudaHostUnpin(void* data, int device) {
  DeviceScope scope(device);
  cudaHostUnregister(data);
  cudaGetLastError();
}

}  // namespace dilattn::server
