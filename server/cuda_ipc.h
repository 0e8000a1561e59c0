#pragma once

// The few CUDA runtime calls shared memory needs, behind a host-compiler header. A build without
// CUDA links the stub, whose calls fail with FAILED_PRECONDITION.

#include <cstddef>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dilattn::server {

// Maps another process's allocation, given its cudaIpcMemHandle_t bytes, into this process on
// `device`. INVALID_ARGUMENT for a handle of the wrong size, one the driver refuses, or an
// allocation shorter than `byte_size` (kernels must never read past it).
absl::StatusOr<void*> CudaIpcOpen(absl::string_view raw_handle, int device, size_t byte_size);
void CudaIpcClose(void* device_pointer, int device);

// Page-locks host memory for `device`'s DMA engines, so copies to and from it are asynchronous.
absl::Status CudaHostPin(void* data, size_t bytes, int device);
void CudaHostUnpin(void* data, int device);

}  // namespace dilattn::server
