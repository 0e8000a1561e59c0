// AVX-512 build of the tile kernel (compiled with -mavx512f and friends by CMake): 32 zmm
// registers hold a 4 x 64 block of accumulators plus operands.
#define DILATTN_VEC 16
#define DILATTN_ROWS 4
#define DILATTN_QK_VECS 4
#define DILATTN_PV_VECS 4
#include "kernels/attention/cpu/tile_kernel_impl.h"

namespace dilattn::attention::cpu {
TileFn Avx512TileKernel() { return &RunTile; }
}  // namespace dilattn::attention::cpu
