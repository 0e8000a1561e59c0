// AVX-512 build (compiled with those flags by CMake): 8 x 32 accumulators are 16 of the 32 zmm
// registers.
#define DILATTN_GEMM_ROWS 8
#define DILATTN_GEMM_COLS 32
#include "kernels/multihead/cpu/gemm_kernel_impl.h"

namespace dilattn::multihead::cpu {
GemmBlockFn Avx512GemmBlock() { return &Block; }
}  // namespace dilattn::multihead::cpu
