// Explicit instantiations of the fused forward kernel for head dim 64.
#include "kernels/attention/cuda/fused_forward.cuh"
#include "kernels/attention/cuda/fused_forward_sm90.cuh"

namespace dilattn::attention::cuda {
template int LaunchFusedForwardFor<64, __half>(const FusedForwardParams&, cudaStream_t);
template int LaunchFusedForwardFor<64, __nv_bfloat16>(const FusedForwardParams&, cudaStream_t);
template int LaunchHopperForward<__half>(const FusedForwardParams&, cudaStream_t);
template int LaunchHopperForward<__nv_bfloat16>(const FusedForwardParams&, cudaStream_t);
}  // namespace dilattn::attention::cuda
