// AVX2 + FMA + F16C build of the tile kernel (compiled with those flags by CMake): 16 ymm
// registers hold a 4 x 16 block of accumulators plus operands.
#define DILATTN_VEC 8
#define DILATTN_ROWS 4
#define DILATTN_QK_VECS 2
#define DILATTN_PV_VECS 2
#include "kernels/attention/cpu/tile_kernel_impl.h"

namespace dilattn::attention::cpu {
TileFn Avx2TileKernel() { return &RunTile; }
}  // namespace dilattn::attention::cpu
