#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/multihead/cuda/launch.h"

namespace dilattn::multihead::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The sum over the block; every thread gets it.
__device__ float BlockSum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One block per row; the grid strides over rows beyond its size.
template <class T>
__global__ void LayerNormKernel(T* data, int64_t rows, int64_t cols, const float* gamma,
                                const float* beta, float eps) {
  __shared__ float scratch[kThreads / 32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T* x = data + row * cols;
    float s = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) s += ToFloat(x[j]);
    const float mean = BlockSum(s, scratch) / static_cast<float>(cols);
    float q = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const float d = ToFloat(x[j]) - mean;
      q += d * d;
    }
    const float inv = rsqrtf(BlockSum(q, scratch) / static_cast<float>(cols) + eps);
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      x[j] = FromFloat<T>((ToFloat(x[j]) - mean) * inv * gamma[j] + beta[j]);
    }
  }
}

}  // namespace

int LaunchLayerNorm(void* data, int64_t rows, int64_t cols, attention::DType dtype,
                    const float* gamma, const float* beta, float eps, void* stream) {
  if (rows <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(rows < 65536 ? rows : 65536);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == attention::DType::kBFloat16) {
    LayerNormKernel<<<grid, kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(data), rows, cols, gamma,
                                              beta, eps);
  } else {
    LayerNormKernel<<<grid, kThreads, 0, s>>>(static_cast<__half*>(data), rows, cols, gamma, beta,
                                              eps);
  }
  return cudaGetLastError();
}

}  // namespace dilattn::multihead::cuda
