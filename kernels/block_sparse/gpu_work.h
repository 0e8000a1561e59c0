#pragma once

// The work list of block-sparse attention on the fused GPU kernels: tiles of up to block_m
// consecutive query rows within one query block (per sequence and head), and per query block
// its selected key blocks as runs of keys (adjacent blocks merged), causal already applied by
// the layout. Skipped block pairs appear nowhere, so the kernel's time follows the kept pairs.
// Pure C++: planned on the host, tested without a GPU.

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/attention/cuda/kernel_params.h"
#include "kernels/attention/gpu_tiles.h"
#include "kernels/block_sparse/block_sparse.h"

namespace dilattn::block_sparse {

struct BlockSparseGpuWork {
  std::vector<attention::GpuTile> tiles;         // costliest first
  std::vector<int32_t> tile_row;                 // per tile, into rows
  std::vector<attention::cuda::KeyRunRow> rows;  // per (layout, query block)
  std::vector<attention::cuda::KeyRun> runs;
};

struct BlockSparseGpuWorkSizes {
  int64_t tiles = 0;
  int64_t rows = 0;
  int64_t runs = 0;
};

// Sizes of the tables BuildBlockSparseGpuWork makes, without making them.
BlockSparseGpuWorkSizes CountBlockSparseGpuWork(const BlockSparsePlan& plan, int block_m);

// INVALID_ARGUMENT when a table would not fit the kernel's 32-bit fields.
absl::Status BuildBlockSparseGpuWork(const BlockSparsePlan& plan, int block_m,
                                     BlockSparseGpuWork* work);

}  // namespace dilattn::block_sparse
