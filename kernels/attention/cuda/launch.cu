// The one dispatch from runtime options (head dim, dtype) to compiled kernel instances, and the
// small element-wise kernels the engine needs around it.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/attention/cuda/fused_forward.cuh"
#include "kernels/attention/cuda/fused_forward_sm90.cuh"
#include "kernels/attention/cuda/fused_forward_sm90_ws.cuh"
#include "kernels/attention/cuda/launch.h"

namespace dilattn::attention::cuda {

#define DILATTN_DECLARE(D)                                                               \
  extern template int LaunchFusedForwardFor<D, __half>(const FusedForwardParams&,        \
                                                       cudaStream_t);                   \
  extern template int LaunchFusedForwardFor<D, __nv_bfloat16>(const FusedForwardParams&, \
                                                              cudaStream_t);
DILATTN_DECLARE(16)
DILATTN_DECLARE(32)
DILATTN_DECLARE(64)
DILATTN_DECLARE(128)
DILATTN_DECLARE(256)
#undef DILATTN_DECLARE
// D = 64 (LaunchHopperForward) and D = 128 (LaunchHopperWsForward) on sm_90a.
extern template int LaunchHopperForward<__half>(const FusedForwardParams&, cudaStream_t);
extern template int LaunchHopperForward<__nv_bfloat16>(const FusedForwardParams&, cudaStream_t);
extern template int LaunchHopperWsForward<__half>(const FusedForwardParams&, cudaStream_t);
extern template int LaunchHopperWsForward<__nv_bfloat16>(const FusedForwardParams&, cudaStream_t);

FusedVariant SelectFusedVariant(int major, int head_dim) {
  return major == 9 && (head_dim == 64 || head_dim == 128) ? FusedVariant::kWgmma
                                                           : FusedVariant::kMmaSync;
}

bool FusedForwardSupportsHeadDim(int head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 ||
         head_dim == 256;
}

int LaunchFusedForward(const FusedForwardParams& params, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const bool bf16 = params.attn.dtype == DType::kBFloat16;
  const KeylessPlacement& keyless = params.keyless;
  if (params.attn.dtype == DType::kFloat32 || keyless.count < 0 ||
      keyless.count > params.num_tiles || keyless.period < 1 || keyless.period > UINT32_MAX ||
      (keyless.count > 0 && (keyless.count - 1) * keyless.period >= params.num_tiles)) {
    return cudaErrorInvalidValue;
  }
  if (params.variant == FusedVariant::kWgmma) {
    switch (params.attn.head_dim) {
      case 64:
        return bf16 ? LaunchHopperForward<__nv_bfloat16>(params, stream)
                    : LaunchHopperForward<__half>(params, stream);
      case 128:
        return bf16 ? LaunchHopperWsForward<__nv_bfloat16>(params, stream)
                    : LaunchHopperWsForward<__half>(params, stream);
      default:
        return cudaErrorInvalidValue;
    }
  }
  switch (params.attn.head_dim) {
    case 16:
      return bf16 ? LaunchFusedForwardFor<16, __nv_bfloat16>(params, stream)
                  : LaunchFusedForwardFor<16, __half>(params, stream);
    case 32:
      return bf16 ? LaunchFusedForwardFor<32, __nv_bfloat16>(params, stream)
                  : LaunchFusedForwardFor<32, __half>(params, stream);
    case 64:
      return bf16 ? LaunchFusedForwardFor<64, __nv_bfloat16>(params, stream)
                  : LaunchFusedForwardFor<64, __half>(params, stream);
    case 128:
      return bf16 ? LaunchFusedForwardFor<128, __nv_bfloat16>(params, stream)
                  : LaunchFusedForwardFor<128, __half>(params, stream);
    case 256:
      return bf16 ? LaunchFusedForwardFor<256, __nv_bfloat16>(params, stream)
                  : LaunchFusedForwardFor<256, __half>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

namespace {

// Passed by value, so that one launch converts a job's Q, K and V: tensor blockIdx.y.
struct HalfTargets {
  __half* out[kMaxConvertTensors];
};

// Rare (a request about to be refused): the request that holds element i, by binary search.
__device__ __noinline__ void FlagRequest(const ConversionFlags& f, int64_t i, int bit) {
  const int64_t e = f.first + i;
  int lo = 0, hi = f.requests - 1;  // the last request whose range starts at or before e
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (f.bounds[mid] <= e) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  atomicOr(f.flags + lo, bit);
}

// Where value i of a conversion sits on its fp16 side.
__device__ __forceinline__ int64_t HalfIndex(int64_t i, HalfRows rows) {
  return rows.row == rows.pitch ? i : i / rows.row * rows.pitch + i % rows.row;
}

__global__ void FloatToHalfKernel(const float* in, HalfTargets targets, int64_t n, HalfRows rows,
                                  ConversionFlags flags) {
  in += blockIdx.y * n;
  __half* out = targets.out[blockIdx.y];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = in[i];
    if (!isfinite(x)) {
      FlagRequest(flags, i, kFp16NonFiniteInput);
    } else if (fabsf(x) > 65504.f) {
      FlagRequest(flags, i, kFp16InputOverflow);
    }
    out[HalfIndex(i, rows)] = __float2half_rn(x);
  }
}

__global__ void HalfToFloatKernel(const __half* in, float* out, int64_t n, HalfRows rows,
                                  ConversionFlags flags) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = __half2float(in[HalfIndex(i, rows)]);
    if (!isfinite(x)) FlagRequest(flags, i, kFp16NonFiniteOutput);
    out[i] = x;
  }
}

unsigned GridFor(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

int LaunchFloatToHalf(const float* in, void* const* outs, int tensors, int64_t n, HalfRows rows,
                      const ConversionFlags& flags, void* stream) {
  if (tensors < 1 || tensors > kMaxConvertTensors || flags.requests < 1 || rows.row < 1 ||
      rows.pitch < rows.row) {
    return cudaErrorInvalidValue;
  }
  HalfTargets targets{};
  for (int t = 0; t < tensors; ++t) targets.out[t] = static_cast<__half*>(outs[t]);
  const dim3 grid(GridFor(n), static_cast<unsigned>(tensors));
  FloatToHalfKernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(in, targets, n, rows,
                                                                         flags);
  return cudaGetLastError();
}

int LaunchHalfToFloat(const void* in, float* out, int64_t n, HalfRows rows,
                      const ConversionFlags& flags, void* stream) {
  if (flags.requests < 1 || rows.row < 1 || rows.pitch < rows.row) return cudaErrorInvalidValue;
  HalfToFloatKernel<<<GridFor(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __half*>(in), out, n, rows, flags);
  return cudaGetLastError();
}

// Thread t moves 16-byte chunk t % chunks of listed row t / chunks, between a (tokens, H, D)
// tensor and a packed array of rows; pairs with a negative token are skipped.
template <bool kGather>
__global__ void MoveHeadRowsKernel(uint4* tensor, int64_t row_chunks, int64_t head_chunks,
                                   const int32_t* rows, int64_t n, uint4* packed) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;  // GridFor caps the grid
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n * head_chunks; i += step) {
    const int64_t row = i / head_chunks;
    const int64_t chunk = i % head_chunks;
    const int64_t token = rows[2 * row];
    if (token < 0) continue;
    uint4* at = tensor + token * row_chunks + rows[2 * row + 1] * head_chunks + chunk;
    if constexpr (kGather) {
      packed[i] = *at;
    } else {
      *at = packed[i];
    }
  }
}

int LaunchMoveHeadRows(bool gather, void* tensor, int64_t row_stride, int head_dim,
                       const int32_t* rows, int64_t n, void* packed, void* stream) {
  // 2-byte elements; D and the row stride are multiples of 8 (16 bytes) on the GPU path.
  if (head_dim % 8 != 0 || row_stride % 8 != 0) return cudaErrorInvalidValue;
  if (n == 0) return 0;
  const int64_t head_chunks = head_dim / 8;
  const int64_t total = n * head_chunks;
  const auto s = static_cast<cudaStream_t>(stream);
  auto* t = static_cast<uint4*>(tensor);
  auto* p = static_cast<uint4*>(packed);
  if (gather) {
    MoveHeadRowsKernel<true>
        <<<GridFor(total), 256, 0, s>>>(t, row_stride / 8, head_chunks, rows, n, p);
  } else {
    MoveHeadRowsKernel<false>
        <<<GridFor(total), 256, 0, s>>>(t, row_stride / 8, head_chunks, rows, n, p);
  }
  return cudaGetLastError();
}

__global__ void TrapKernel() { __trap(); }

int LaunchTrap(void* stream) {
  TrapKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>();
  return cudaGetLastError();
}

__global__ void SpinKernel(int64_t nanoseconds) {
  uint64_t start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < static_cast<uint64_t>(nanoseconds));
}

int LaunchSpin(int64_t nanoseconds, void* stream) {
  SpinKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(nanoseconds);
  return cudaGetLastError();
}

}  // namespace dilattn::attention::cuda
