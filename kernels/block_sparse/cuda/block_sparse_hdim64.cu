// Explicit instantiations of the block-sparse kernels for head dim 64.
#include "kernels/attention/cuda/fused_forward.cuh"
#include "kernels/attention/cuda/fused_forward_sm90.cuh"
#include "kernels/block_sparse/cuda/key_runs.cuh"

namespace dilattn::attention::cuda {
using block_sparse::cuda::KeyRunSpans;
template int LaunchFusedForwardFor<64, __half, KeyRunSpans>(const FusedForwardParams&,
                                                            cudaStream_t);
template int LaunchFusedForwardFor<64, __nv_bfloat16, KeyRunSpans>(const FusedForwardParams&,
                                                                   cudaStream_t);
template int LaunchHopperForward<__half, KeyRunSpans>(const FusedForwardParams&, cudaStream_t);
template int LaunchHopperForward<__nv_bfloat16, KeyRunSpans>(const FusedForwardParams&,
                                                             cudaStream_t);
}  // namespace dilattn::attention::cuda
