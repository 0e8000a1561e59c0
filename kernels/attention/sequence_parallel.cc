#include "kernels/attention/sequence_parallel.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/attention/tile_spans.h"

namespace dilattn::attention {
absl::StatusOr<SequenceParallelPlan> PlanSequenceParallel(const AttentionPlan& plan,
                                                          int num_gpus, int block_m) {
  const DilatedAttentionParams& p = plan.params;
  if (plan.seq_offsets.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence parallelism splits one sequence; the batch holds ",
        static_cast<int64_t>(plan.seq_offsets.size()) - 1));
  }
  if (num_gpus < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_gpus must be >= 1, got ", num_gpus));
  }
  const int64_t n = plan.seq_offsets[1] - plan.seq_offsets[0];
  const int64_t target = (n + num_gpus - 1) / num_gpus;
  // Slice bounds fall on segment boundaries of every branch whose segments fit a slice.
  int64_t align = 1;
  for (int b = 0; b < p.num_branches; ++b) {
    const int64_t w = std::min(p.segment_length[b], n);
    if (w > target) continue;
    const int64_t l = align / std::gcd(align, w);
    align = l > n / w ? n : l * w;
  }
  const int64_t size = std::min(n, (target + align - 1) / align * align);
  SequenceParallelPlan out;
  for (int64_t begin = 0; begin < n; begin += size) {
    SequenceSlicePlan s;
    s.begin = begin;
    s.end = std::min(n, begin + size);
    out.slices.push_back(std::move(s));
  }
  const int64_t slices = static_cast<int64_t>(out.slices.size());
  if (slices > 1) {
    for (int b = 0; b < p.num_branches; ++b) {
      const int64_t w = std::min(p.segment_length[b], n);
      if (size % w != 0) out.spanning_branches.push_back(b);
    }
  }

  std::vector<GpuTile> all;
  KeylessPlacement keyless;
  if (absl::Status s = BuildGpuTiles(plan, block_m, &all, &keyless); !s.ok()) return s;
  std::vector<std::vector<GpuTile>> rest(static_cast<size_t>(slices));
  // A tile whose rows cross a slice bound (its cell spans the bound: no branch has a segment
  // boundary there) is cut there; every row of a tile shares its key set, so each part plans the
  // same spans. Keyless tiles go first in each slice, where the kernel finds them by index.
  for (size_t i = 0; i < all.size(); ++i) {
    const GpuTile& t = all[i];
    const bool is_keyless = IsKeylessSlot(keyless, static_cast<int64_t>(i));
    int64_t row = 0;
    while (row < t.count) {
      const int64_t pos = t.q_pos + row * t.q_stride;
      const int64_t g = pos / size;
      const int64_t bound = std::min(n, (g + 1) * size);
      const int64_t rows = std::min<int64_t>(t.count - row, (bound - pos - 1) / t.q_stride + 1);
      GpuTile part = t;
      part.q_pos = static_cast<int32_t>(pos);
      part.count = static_cast<int16_t>(rows);
      SequenceSlicePlan& slice = out.slices[static_cast<size_t>(g)];
      if (is_keyless) {
        slice.tiles.push_back(part);
        ++slice.keyless.count;
      } else {
        rest[static_cast<size_t>(g)].push_back(part);
      }
      row += rows;
    }
  }
  for (int64_t g = 0; g < slices; ++g) {
    SequenceSlicePlan& slice = out.slices[static_cast<size_t>(g)];
    slice.tiles.insert(slice.tiles.end(), rest[static_cast<size_t>(g)].begin(),
                       rest[static_cast<size_t>(g)].end());
    slice.keyless.period = 1;
    slice.key_begin = slice.begin;
    slice.key_end = slice.end;
    for (int b : out.spanning_branches) {
      const int64_t w = std::min(p.segment_length[b], n);
      slice.key_begin = std::min(slice.key_begin, slice.begin / w * w);
      slice.key_end = std::max(slice.key_end, std::min(n, (slice.end + w - 1) / w * w));
    }
    // Causal spans end at the tile's last row (PlanKeySpans), so no key after the slice is read.
    if (p.causal) slice.key_end = slice.end;
    // The rows of spanning branches in this slice, (position, head) each.
    for (int b : out.spanning_branches) {
      const int64_t w = std::min(p.segment_length[b], n);
      const int64_t r = ClampedRate<int64_t>(p, b);
      for (int h = 0; h < p.num_heads; ++h) {
        int64_t offset = 0;
        if (!BranchHeadOffset<int64_t>(p, b, h, r, &offset) || offset >= w) continue;
        for (int64_t s0 = slice.begin / w * w; s0 < slice.end; s0 += w) {
          const int64_t limit = std::min({s0 + w, n, slice.end});
          int64_t pos = s0 + offset;
          if (pos < slice.begin) {  // the first kept position in the slice, without overflow
            const int64_t k = (slice.begin - pos - 1) / r + 1;
            if (k > (limit - pos) / r) continue;
            pos += k * r;
          }
          while (pos < limit) {
            slice.send_rows.push_back(static_cast<int32_t>(pos));
            slice.send_rows.push_back(h);
            if (r >= limit - pos) break;
            pos += r;
          }
        }
      }
    }
    out.max_send_rows =
        std::max(out.max_send_rows, static_cast<int64_t>(slice.send_rows.size() / 2));
  }
  return out;
}

}  // namespace dilattn::attention
