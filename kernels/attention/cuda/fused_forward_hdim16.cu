// Explicit instantiations of the fused forward kernel for head dim 16.
#include "kernels/attention/cuda/fused_forward.cuh"

namespace dilattn::attention::cuda {
template int LaunchFusedForwardFor<16, __half>(const FusedForwardParams&, cudaStream_t);
template int LaunchFusedForwardFor<16, __nv_bfloat16>(const FusedForwardParams&, cudaStream_t);
}  // namespace dilattn::attention::cuda
