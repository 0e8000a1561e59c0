// The dispatch of block-sparse attention from runtime options (head dim, dtype, variant) to the
// fused kernels' instances over key runs.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/attention/cuda/fused_forward.cuh"
#include "kernels/attention/cuda/fused_forward_sm90.cuh"
#include "kernels/attention/cuda/fused_forward_sm90_ws.cuh"
#include "kernels/block_sparse/cuda/key_runs.cuh"
#include "kernels/block_sparse/cuda/launch.h"

namespace dilattn::attention::cuda {
using block_sparse::cuda::KeyRunSpans;
#define DILATTN_DECLARE(D)                                                                     \
  extern template int LaunchFusedForwardFor<D, __half, KeyRunSpans>(const FusedForwardParams&, \
                                                                    cudaStream_t);             \
  extern template int LaunchFusedForwardFor<D, __nv_bfloat16, KeyRunSpans>(                    \
      const FusedForwardParams&, cudaStream_t);
DILATTN_DECLARE(16)
DILATTN_DECLARE(32)
DILATTN_DECLARE(64)
DILATTN_DECLARE(128)
DILATTN_DECLARE(256)
#undef DILATTN_DECLARE
extern template int LaunchHopperForward<__half, KeyRunSpans>(const FusedForwardParams&,
                                                             cudaStream_t);
extern template int LaunchHopperForward<__nv_bfloat16, KeyRunSpans>(const FusedForwardParams&,
                                                                    cudaStream_t);
extern template int LaunchHopperWsForward<__half, KeyRunSpans>(const FusedForwardParams&,
                                                               cudaStream_t);
extern template int LaunchHopperWsForward<__nv_bfloat16, KeyRunSpans>(const FusedForwardParams&,
                                                                      cudaStream_t);
}  // namespace dilattn::attention::cuda

namespace dilattn::block_sparse::cuda {

using attention::cuda::FusedForwardParams;
using attention::cuda::FusedVariant;
using attention::cuda::LaunchFusedForwardFor;
using attention::cuda::LaunchHopperForward;
using attention::cuda::LaunchHopperWsForward;

bool BlockSparseSupportsHeadDim(int head_dim) {
  return attention::cuda::FusedForwardSupportsHeadDim(head_dim);
}

int LaunchBlockSparseForward(const FusedForwardParams& params, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const bool bf16 = params.attn.dtype == attention::DType::kBFloat16;
  if (params.attn.dtype == attention::DType::kFloat32 || params.keyless.count != 0 ||
      params.key_runs.tile_row == nullptr || params.key_runs.rows == nullptr ||
      params.key_runs.runs == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool wgmma = params.variant == FusedVariant::kWgmma;
  switch (params.attn.head_dim) {
    case 16:
      return bf16 ? LaunchFusedForwardFor<16, __nv_bfloat16, KeyRunSpans>(params, stream)
                  : LaunchFusedForwardFor<16, __half, KeyRunSpans>(params, stream);
    case 32:
      return bf16 ? LaunchFusedForwardFor<32, __nv_bfloat16, KeyRunSpans>(params, stream)
                  : LaunchFusedForwardFor<32, __half, KeyRunSpans>(params, stream);
    case 256:
      return bf16 ? LaunchFusedForwardFor<256, __nv_bfloat16, KeyRunSpans>(params, stream)
                  : LaunchFusedForwardFor<256, __half, KeyRunSpans>(params, stream);
    case 64:
      if (wgmma) {
        return bf16 ? LaunchHopperForward<__nv_bfloat16, KeyRunSpans>(params, stream)
                    : LaunchHopperForward<__half, KeyRunSpans>(params, stream);
      }
      return bf16 ? LaunchFusedForwardFor<64, __nv_bfloat16, KeyRunSpans>(params, stream)
                  : LaunchFusedForwardFor<64, __half, KeyRunSpans>(params, stream);
    case 128:
      if (wgmma) {
        return bf16 ? LaunchHopperWsForward<__nv_bfloat16, KeyRunSpans>(params, stream)
                    : LaunchHopperWsForward<__half, KeyRunSpans>(params, stream);
      }
      return bf16 ? LaunchFusedForwardFor<128, __nv_bfloat16, KeyRunSpans>(params, stream)
                  : LaunchFusedForwardFor<128, __half, KeyRunSpans>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace dilattn::block_sparse::cuda
