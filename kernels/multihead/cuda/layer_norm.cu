#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/multihead/cuda/launch.h"

namespace dilattn::multihead::cuda {
namespace {

// One warp per row, 16-byte loads (8 values): E % 8 == 0 and rows 16-byte aligned, as the
// backend's selector requires. The row stays in L1 between the passes.
constexpr int kWarps = 8;

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

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Padded rows (Padded) take only each head's first head_dim columns into the statistics.
template <class T, bool Padded>
__global__ void LayerNormKernel(T* data, int64_t rows, RowHeads heads, const float* gamma,
                                const float* beta, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t cols = heads.num_heads * heads.pad_dim;
  const float count = static_cast<float>(heads.num_heads * heads.head_dim);
  const int64_t chunks = cols / 8;
  auto real = [&](int64_t j) { return !Padded || j % heads.pad_dim < heads.head_dim; };
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += warps) {
    uint4* x = reinterpret_cast<uint4*>(data + row * cols);
    float s = 0;
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint4 u = x[c];
      const T* v = reinterpret_cast<const T*>(&u);
      for (int i = 0; i < 8; ++i) s += real(c * 8 + i) ? ToFloat(v[i]) : 0.0f;
    }
    const float mean = WarpSum(s) / count;
    float q = 0;
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint4 u = x[c];
      const T* v = reinterpret_cast<const T*>(&u);
      for (int i = 0; i < 8; ++i) {
        const float d = ToFloat(v[i]) - mean;
        q += real(c * 8 + i) ? d * d : 0.0f;
      }
    }
    const float inv = rsqrtf(WarpSum(q) / count + eps);
    for (int64_t c = lane; c < chunks; c += 32) {
      uint4 u = x[c];
      T* v = reinterpret_cast<T*>(&u);
      for (int i = 0; i < 8; ++i) {
        const int64_t j = c * 8 + i;
        v[i] = FromFloat<T>((ToFloat(v[i]) - mean) * inv * gamma[j] + beta[j]);
      }
      x[c] = u;
    }
  }
}

}  // namespace

int LaunchLayerNorm(void* data, int64_t rows, RowHeads heads, attention::DType dtype,
                    const float* gamma, const float* beta, float eps, void* stream) {
  if (rows <= 0) return cudaSuccess;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  auto s = static_cast<cudaStream_t>(stream);
  auto launch = [&](auto* typed) {
    if (heads.pad_dim != heads.head_dim) {
      LayerNormKernel<std::remove_pointer_t<decltype(typed)>, true>
          <<<grid, kWarps * 32, 0, s>>>(typed, rows, heads, gamma, beta, eps);
    } else {
      LayerNormKernel<std::remove_pointer_t<decltype(typed)>, false>
          <<<grid, kWarps * 32, 0, s>>>(typed, rows, heads, gamma, beta, eps);
    }
  };
  if (dtype == attention::DType::kBFloat16) {
    launch(static_cast<__nv_bfloat16*>(data));
  } else {
    launch(static_cast<__half*>(data));
  }
  return cudaGetLastError();
}

}  // namespace dilattn::multihead::cuda
