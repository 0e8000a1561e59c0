// Explicit instantiations of the fused forward kernel for head dim 128.
#include "kernels/attention/cuda/fused_forward.cuh"
#include "kernels/attention/cuda/fused_forward_sm90_ws.cuh"

namespace dilattn::attention::cuda {
template int LaunchFusedForwardFor<128, __half>(const FusedForwardParams&, cudaStream_t);
template int LaunchFusedForwardFor<128, __nv_bfloat16>(const FusedForwardParams&, cudaStream_t);
template int LaunchHopperWsForward<__half>(const FusedForwardParams&, cudaStream_t);
template int LaunchHopperWsForward<__nv_bfloat16>(const FusedForwardParams&, cudaStream_t);
}  // namespace dilattn::attention::cuda
