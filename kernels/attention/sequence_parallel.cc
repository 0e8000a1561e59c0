#include "kernels/attention/sequence_parallel.h"

#include <algorithm>
#include <limits>
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
    // A branch whose boundaries, with the others', would make a slice longer than its target is
    // exchanged like a spanning one instead: aligning to it would leave fewer, lopsided slices
    // (segments 2048 and 3000 over 2 GPUs at 512K tokens: one slice of all of it).
    if (l > target / w) continue;
    align = l * w;
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
  std::vector<std::vector<int>> send_branch(static_cast<size_t>(slices));
  for (int64_t g = 0; g < slices; ++g) {
    SequenceSlicePlan& slice = out.slices[static_cast<size_t>(g)];
    slice.tiles.insert(slice.tiles.end(), rest[static_cast<size_t>(g)].begin(),
                       rest[static_cast<size_t>(g)].end());
    slice.keyless.period = 1;
    // The packed keys of each spanning branch: its segments that overlap the slice, after the
    // slice's own rows.
    slice.packed.assign(static_cast<size_t>(p.num_branches), PackedKeys{});
    int64_t cursor = slice.end;  // < 2^31, as every position on the GPU path
    for (int b : out.spanning_branches) {
      const int64_t w = std::min(p.segment_length[b], n);
      const int64_t r = ClampedRate<int64_t>(p, b);
      const int64_t first_segment = slice.begin / w, last_segment = (slice.end - 1) / w;
      const int64_t per_segment = (w + r - 1) / r;
      slice.packed[static_cast<size_t>(b)] = {static_cast<int32_t>(cursor),
                                              static_cast<int32_t>(first_segment * w),
                                              static_cast<int32_t>(per_segment)};
      cursor += (last_segment - first_segment + 1) * per_segment;
      if (cursor > std::numeric_limits<int32_t>::max()) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequence parallelism: slice ", g, " would hold ", cursor,
                         " K/V row positions; the kernel addresses fewer than 2^31"));
      }
    }
    slice.key_rows_end = cursor;
    // The rows of spanning branches in this slice, (position, head) each, and their branches.
    std::vector<int>& branch_of = send_branch[static_cast<size_t>(g)];
    for (int b : out.spanning_branches) {
      const int64_t w = std::min(p.segment_length[b], n);
      const int64_t r = ClampedRate<int64_t>(p, b);
      for (int h = 0; h < p.num_heads; ++h) {
        int64_t offset = 0;
        if (!BranchHeadOffset<int64_t>(p, b, h, r, &offset) || offset >= w) continue;
        for (int64_t s0 = slice.begin / w * w; s0 < slice.end; s0 += w) {
          const int64_t limit = std::min({s0 + w, n, slice.end});
          int64_t pos = 0;  // the first kept position in the slice
          if (!FirstInRange<int64_t>(s0 + offset, r, slice.begin, limit, &pos)) continue;
          while (pos < limit) {
            slice.send_rows.push_back(static_cast<int32_t>(pos));
            slice.send_rows.push_back(h);
            branch_of.push_back(b);
            if (r >= limit - pos) break;
            pos += r;
          }
        }
      }
    }
    out.max_send_rows =
        std::max(out.max_send_rows, static_cast<int64_t>(slice.send_rows.size() / 2));
  }
  // Where each sent row lands in each slice's packed keys.
  for (auto& slice : out.slices) {
    slice.receive_rows.resize(static_cast<size_t>(slices));
    for (int64_t o = 0; o < slices; ++o) {
      const SequenceSlicePlan& from = out.slices[static_cast<size_t>(o)];
      std::vector<int32_t>& to = slice.receive_rows[static_cast<size_t>(o)];
      to.reserve(from.send_rows.size());
      for (size_t i = 0; i < from.send_rows.size(); i += 2) {
        const int b = send_branch[static_cast<size_t>(o)][i / 2];
        const int64_t pos = from.send_rows[i];
        const int h = from.send_rows[i + 1];
        const int64_t w = std::min(p.segment_length[b], n);
        const int64_t r = ClampedRate<int64_t>(p, b);
        const PackedKeys& pk = slice.packed[static_cast<size_t>(b)];
        int64_t offset = 0;
        BranchHeadOffset<int64_t>(p, b, h, r, &offset);
        const int64_t start = pos / w * w;
        const bool held = start >= pk.origin && start <= (slice.end - 1) / w * w;
        to.push_back(held ? static_cast<int32_t>(PackedSegmentRow<int64_t>(pk, start, w) +
                                                 (pos - start - offset) / r)
                          : -1);
        to.push_back(h);
      }
    }
  }
  return out;
}

std::vector<std::pair<int64_t, int64_t>> SliceParts(const DilatedAttentionParams& params,
                                                    bool spanning, int64_t begin, int64_t end,
                                                    int parts, bool* by_segments) {
  const int64_t rows = end - begin;
  int64_t unit = parts > 1 && !spanning ? SegmentCutUnit(params, rows / parts) : 0;
  if (unit > 0 && begin % unit != 0) unit = 0;
  *by_segments = unit > 0;
  auto cut = [&](int c) {
    const int64_t at = rows * c / parts;
    return begin + (unit > 0 && c < parts ? at / unit * unit : at);
  };
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int c = 0; c < parts; ++c) {
    if (cut(c) < cut(c + 1)) ranges.emplace_back(cut(c), cut(c + 1));
  }
  return ranges;
}

std::vector<std::vector<size_t>> SequenceParallelLeases(const SequenceParallelPlan& sp,
                                                        const AttentionPlan& plan, int ranks) {
  const DilatedAttentionParams& p = plan.params;
  const size_t row_bytes = static_cast<size_t>(p.num_heads) * static_cast<size_t>(p.head_dim) * 2;
  const size_t pack_bytes =
      static_cast<size_t>(sp.max_send_rows) * static_cast<size_t>(p.head_dim) * 2;
  const bool exchange = !sp.spanning_branches.empty();
  size_t all_rows = 0;  // int32 entries of every slice's send list
  for (const SequenceSlicePlan& s : sp.slices) all_rows += s.send_rows.size();
  auto leased = [](size_t bytes) { return std::max<size_t>(bytes, 16); };
  std::vector<std::vector<size_t>> out(static_cast<size_t>(ranks));
  for (int g = 0; g < ranks; ++g) {
    std::vector<size_t>& l = out[static_cast<size_t>(g)];
    const bool owns = g < static_cast<int>(sp.slices.size());
    const SequenceSlicePlan* s = owns ? &sp.slices[static_cast<size_t>(g)] : nullptr;
    const size_t slice_bytes = owns ? static_cast<size_t>(s->end - s->begin) * row_bytes : 0;
    const size_t key_bytes = owns ? static_cast<size_t>(s->key_rows_end - s->begin) * row_bytes : 0;
    for (size_t b : {key_bytes, key_bytes, slice_bytes, slice_bytes}) l.push_back(leased(b));
    if (exchange) {
      size_t dest = 0;
      if (owns) {
        for (const std::vector<int32_t>& from : s->receive_rows) dest += from.size();
      }
      for (size_t b : {2 * pack_bytes, 2 * pack_bytes * static_cast<size_t>(ranks),
                       all_rows * sizeof(int32_t), dest * sizeof(int32_t)}) {
        l.push_back(leased(b));
      }
    }
    const size_t tiles = owns ? s->tiles.size() : 0;
    l.push_back(leased(256 + 2 * tiles * sizeof(GpuTile)));
  }
  return out;
}

}  // namespace dilattn::attention
