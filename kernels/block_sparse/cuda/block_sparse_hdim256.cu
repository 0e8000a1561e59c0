// Explicit instantiations of the block-sparse kernel for head dim 256 (mma.sync on every card).
#include "kernels/attention/cuda/fused_forward.cuh"
#include "kernels/block_sparse/cuda/key_runs.cuh"

namespace dilattn::attention::cuda {
using block_sparse::cuda::KeyRunSpans;
template int LaunchFusedForwardFor<256, __half, KeyRunSpans>(const FusedForwardParams&,
                                                            cudaStream_t);
template int LaunchFusedForwardFor<256, __nv_bfloat16, KeyRunSpans>(const FusedForwardParams&,
                                                                   cudaStream_t);
}  // namespace dilattn::attention::cuda
