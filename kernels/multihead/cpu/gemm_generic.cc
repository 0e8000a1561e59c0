// Portable build of the GEMM block kernel (SSE2 on x86-64: 16 xmm registers).
#define DILATTN_GEMM_ROWS 4
#define DILATTN_GEMM_COLS 8
#include "kernels/multihead/cpu/gemm_kernel_impl.h"

namespace dilattn::multihead::cpu {
GemmBlockFn GenericGemmBlock() { return &Block; }
}  // namespace dilattn::multihead::cpu
