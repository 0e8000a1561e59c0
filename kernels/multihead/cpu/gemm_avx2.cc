// AVX2 + FMA build (compiled with those flags by CMake): 4 x 24 accumulators are 12 of the 16 ymm
// registers, leaving three for b and one for the broadcast of a.
#define DILATTN_GEMM_ROWS 4
#define DILATTN_GEMM_COLS 24
#include "kernels/multihead/cpu/gemm_kernel_impl.h"

namespace dilattn::multihead::cpu {
GemmBlockFn Avx2GemmBlock() { return &Block; }
}  // namespace dilattn::multihead::cpu
