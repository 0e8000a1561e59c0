#include "kernels/block_sparse/gpu_work.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace dilattn::block_sparse {
namespace {

using attention::GpuTile;
using attention::cuda::KeyRun;
using attention::cuda::KeyRunRow;

constexpr int64_t kKeyTile = 64;  // keys per tile of the kernels' walk (kBlockN)

int64_t RunsOfRow(const BlockLayout& layout, int64_t i) {
  int64_t runs = 0;
  for (int64_t c = layout.row_begin[i]; c < layout.row_begin[i + 1]; ++c) {
    if (c == layout.row_begin[i] || layout.cols[c] != layout.cols[c - 1] + 1) ++runs;
  }
  return runs;
}

int64_t TilesOfBlock(const BlockSparsePlan& plan, const BlockLayout& layout, int64_t i,
                     int block_m) {
  const int64_t bs = plan.options.block_size;
  const int64_t rows = std::min(bs, layout.seq_len - i * bs);
  return (rows + block_m - 1) / block_m;
}

}  // namespace

BlockSparseGpuWorkSizes CountBlockSparseGpuWork(const BlockSparsePlan& plan, int block_m) {
  BlockSparseGpuWorkSizes sizes;
  std::vector<int64_t> layout_tiles(plan.layouts.size(), 0);
  for (size_t l = 0; l < plan.layouts.size(); ++l) {
    const BlockLayout& layout = plan.layouts[l];
    sizes.rows += layout.num_blocks;
    for (int64_t i = 0; i < layout.num_blocks; ++i) {
      sizes.runs += RunsOfRow(layout, i);
      layout_tiles[l] += TilesOfBlock(plan, layout, i, block_m);
    }
  }
  for (int32_t l : plan.seq_layout) sizes.tiles += layout_tiles[static_cast<size_t>(l)];
  sizes.tiles *= plan.shape.num_heads;
  return sizes;
}

absl::Status BuildBlockSparseGpuWork(const BlockSparsePlan& plan, int block_m,
                                     BlockSparseGpuWork* work) {
  const BlockSparseGpuWorkSizes sizes = CountBlockSparseGpuWork(plan, block_m);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (sizes.tiles > kMax || sizes.rows > kMax || sizes.runs > kMax ||
      plan.params.max_seq_len > attention::kGpuMaxSeqLen ||
      plan.shape.num_heads > attention::kGpuMaxHeads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block-sparse problem too large for the GPU tables: ", sizes.tiles, " tiles, ", sizes.rows,
        " query blocks, ", sizes.runs, " key runs, N=", plan.params.max_seq_len,
        ", H=", plan.shape.num_heads, " (each at most ", kMax, ", N at most ",
        attention::kGpuMaxSeqLen, ", H at most ", attention::kGpuMaxHeads, ")"));
  }
  work->tiles.clear();
  work->tile_row.clear();
  work->rows.clear();
  work->runs.clear();
  work->rows.reserve(static_cast<size_t>(sizes.rows));
  work->runs.reserve(static_cast<size_t>(sizes.runs));
  const int64_t bs = plan.options.block_size;
  // Per layout: where its rows start, and each row's visible keys (its tiles' cost).
  std::vector<int32_t> row_base(plan.layouts.size());
  std::vector<int64_t> row_keys;
  row_keys.reserve(static_cast<size_t>(sizes.rows));
  for (size_t l = 0; l < plan.layouts.size(); ++l) {
    const BlockLayout& layout = plan.layouts[l];
    row_base[l] = static_cast<int32_t>(work->rows.size());
    for (int64_t i = 0; i < layout.num_blocks; ++i) {
      KeyRunRow row{static_cast<int32_t>(work->runs.size()), 0, 0, 0};
      int64_t keys = 0;
      for (int64_t c = layout.row_begin[i]; c < layout.row_begin[i + 1]; ++c) {
        const int64_t j = layout.cols[static_cast<size_t>(c)];
        const int64_t first = j * bs;
        const int64_t count = std::min(bs, layout.seq_len - first);
        if (row.num_runs > 0 && work->runs.back().first + work->runs.back().count == first) {
          work->runs.back().count += static_cast<int32_t>(count);
        } else {
          work->runs.push_back({static_cast<int32_t>(first), static_cast<int32_t>(count)});
          ++row.num_runs;
        }
        keys += count;
      }
      for (int32_t r = 0; r + 1 < row.num_runs; ++r) {
        row.lead_tiles += static_cast<int32_t>(
            (work->runs[static_cast<size_t>(row.run_begin) + static_cast<size_t>(r)].count +
             kKeyTile - 1) /
            kKeyTile);
      }
      work->rows.push_back(row);
      row_keys.push_back(keys);
    }
  }
  std::vector<int64_t> cost;
  cost.reserve(static_cast<size_t>(sizes.tiles));
  work->tiles.reserve(static_cast<size_t>(sizes.tiles));
  work->tile_row.reserve(static_cast<size_t>(sizes.tiles));
  for (size_t s = 0; s < plan.seq_layout.size(); ++s) {
    const size_t l = static_cast<size_t>(plan.seq_layout[s]);
    const BlockLayout& layout = plan.layouts[l];
    for (int64_t h = 0; h < plan.shape.num_heads; ++h) {
      for (int64_t i = 0; i < layout.num_blocks; ++i) {
        const int32_t row = row_base[l] + static_cast<int32_t>(i);
        const int64_t end = std::min((i + 1) * bs, layout.seq_len);
        for (int64_t q = i * bs; q < end; q += block_m) {
          const int64_t count = std::min<int64_t>(block_m, end - q);
          work->tiles.push_back({static_cast<int32_t>(s), static_cast<int32_t>(q), 1,
                                 static_cast<int16_t>(h), static_cast<int16_t>(count)});
          work->tile_row.push_back(row);
          cost.push_back(count * row_keys[static_cast<size_t>(row)]);
        }
      }
    }
  }
  // Costliest first, so that a grid walking the list in order ends on short tiles; equal costs
  // keep the order they were made in (sequence, head, block), which reads neighbouring keys
  // close together in time.
  std::vector<int64_t> order(work->tiles.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return cost[static_cast<size_t>(a)] > cost[static_cast<size_t>(b)];
  });
  std::vector<GpuTile> tiles(order.size());
  std::vector<int32_t> tile_row(order.size());
  for (size_t k = 0; k < order.size(); ++k) {
    tiles[k] = work->tiles[static_cast<size_t>(order[k])];
    tile_row[k] = work->tile_row[static_cast<size_t>(order[k])];
  }
  work->tiles = std::move(tiles);
  work->tile_row = std::move(tile_row);
  return absl::OkStatus();
}

}  // namespace dilattn::block_sparse
