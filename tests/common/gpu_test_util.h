#pragma once

// What the GPU tests share: whether a device is here (tests skip, not fail, without one) and a
// device allocation that frees itself.

#include <cuda_runtime_api.h>

#include <cstddef>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {

inline bool HaveDevice() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

#define REQUIRE_GPU()                                                             \
  do {                                                                            \
    if (!::dilattn::testing::HaveDevice()) GTEST_SKIP() << "no CUDA device here"; \
  } while (0)

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    if (n > 0 && cudaMalloc(&ptr, n) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// Runs a device backend (dilated or block-sparse) on host tensors of `bytes` each: uploads Q, K,
// V, fills O with all-ones bytes (NaN in fp16 and bf16), runs, downloads O into `out`. O sits
// `o_offset` bytes into its allocation.
template <class Backend, class Plan>
absl::Status RunOnDevice(Backend& gpu, const Plan& plan, size_t bytes, const TypedBuffer& q,
                         const TypedBuffer& k, const TypedBuffer& v, TypedBuffer* out,
                         size_t o_offset = 0) {
  DeviceBuffer dq(bytes), dk(bytes), dv(bytes), dout_alloc(bytes + 16);
  void* const dout =
      dout_alloc.ptr == nullptr ? nullptr : static_cast<unsigned char*>(dout_alloc.ptr) + o_offset;
  DeviceBuffer ws(gpu.WorkspaceBytes(plan) > 0 ? gpu.WorkspaceBytes(plan) : 1);
  if (dq.ptr == nullptr || dk.ptr == nullptr || dv.ptr == nullptr || dout == nullptr ||
      ws.ptr == nullptr) {
    return absl::ResourceExhaustedError("cudaMalloc failed");
  }
  cudaMemcpy(dq.ptr, const_cast<TypedBuffer&>(q).data(), bytes, cudaMemcpyHostToDevice);
  cudaMemcpy(dk.ptr, const_cast<TypedBuffer&>(k).data(), bytes, cudaMemcpyHostToDevice);
  cudaMemcpy(dv.ptr, const_cast<TypedBuffer&>(v).data(), bytes, cudaMemcpyHostToDevice);
  cudaMemset(dout, 0xff, bytes);
  const DeviceLoc dev = gpu.location();
  absl::Status s = gpu.Run(
      plan, {{dq.ptr, bytes, dev}, {dk.ptr, bytes, dev}, {dv.ptr, bytes, dev}, {dout, bytes, dev}},
      {ws.ptr, ws.bytes, dev});
  if (!s.ok()) return s;
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
    return absl::InternalError(cudaGetErrorString(e));
  }
  if (cudaError_t e = cudaMemcpy(out->data(), dout, bytes, cudaMemcpyDeviceToHost);
      e != cudaSuccess) {
    return absl::InternalError(cudaGetErrorString(e));
  }
  return absl::OkStatus();
}

}  // namespace dilattn::testing
