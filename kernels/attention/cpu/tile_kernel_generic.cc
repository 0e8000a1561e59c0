// Baseline build of the tile kernel: 4-float vectors (SSE2 on x86-64, NEON on arm64).
#define DILATTN_VEC 4
#define DILATTN_ROWS 4
#define DILATTN_QK_VECS 2
#define DILATTN_PV_VECS 2
#include "kernels/attention/cpu/tile_kernel_impl.h"

namespace dilattn::attention::cpu {
TileFn GenericTileKernel() { return &RunTile; }
}  // namespace dilattn::attention::cpu
