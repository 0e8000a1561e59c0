// The sequence-parallel plan, checked without a GPU: the slices' tiles are exactly the single-GPU
// tile list, each tile's rows lie in its slice, and every key a tile's rows see (BranchKeySpan,
// the kernel's own rule) is in its slice, or, for a branch whose segments span slices, in the
// packed row the kernel reads it from, put there by the exchange.

#include "kernels/attention/sequence_parallel.h"

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention/tile_spans.h"
#include "tests/common/random_config.h"

namespace dilattn::testing {
namespace {

using attention::GpuTile;

TEST(SequenceParallelPlan, SlicesCoverTheTilesAndEveryKeyIsHeldOrSent) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  RandomCaseLimits limits;
  limits.max_seq_len = 3000;
  limits.max_heads = 4;
  for (int c = 0; c < 150; ++c) {
    RandomCase rc = DrawCase(rng, limits);
    rc.shape.seq_lengths.resize(1);
    SCOPED_TRACE(rc.Describe());
    auto plan = attention::PlanAttention(rc.options, rc.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int gpus = static_cast<int>(rng.Uniform(1, 4));
    auto sp = attention::PlanSequenceParallel(*plan, gpus, 128);
    ASSERT_TRUE(sp.ok()) << sp.status();
    ASSERT_LE(static_cast<int>(sp->slices.size()), gpus);
    if (sp->slices.size() == 1) {
      EXPECT_TRUE(sp->spanning_branches.empty());
    }

    // Every (position, head) row of the single-GPU list, keyless ones split at slice bounds.
    std::vector<GpuTile> single;
    attention::KeylessPlacement single_keyless;
    ASSERT_TRUE(attention::BuildGpuTiles(*plan, 128, &single, &single_keyless).ok());
    std::multiset<std::tuple<int64_t, int, bool>> want, got;
    for (size_t i = 0; i < single.size(); ++i) {
      const GpuTile& t = single[i];
      const bool keyless = attention::IsKeylessSlot(single_keyless, static_cast<int64_t>(i));
      for (int row = 0; row < t.count; ++row) {
        want.insert({t.q_pos + static_cast<int64_t>(row) * t.q_stride, t.head, keyless});
      }
    }
    const attention::DilatedAttentionParams& p = plan->params;
    const int64_t n = rc.shape.seq_lengths[0];
    int64_t covered = 0;
    for (size_t g = 0; g < sp->slices.size(); ++g) {
      const auto& s = sp->slices[g];
      ASSERT_EQ(s.begin, covered);
      covered = s.end;
      ASSERT_GE(s.key_rows_end, s.end);
      ASSERT_EQ(s.receive_rows.size(), sp->slices.size());
      for (size_t i = 0; i + 1 < s.send_rows.size(); i += 2) {
        EXPECT_GE(s.send_rows[i], s.begin);
        EXPECT_LT(s.send_rows[i], s.end);
      }
    }
    EXPECT_EQ(covered, n);
    for (size_t g = 0; g < sp->slices.size(); ++g) {
      const auto& s = sp->slices[g];
      // What the exchange leaves in this GPU's packed rows: (row position, head) -> position.
      std::map<std::pair<int64_t, int>, int64_t> filled;
      for (size_t o = 0; o < sp->slices.size(); ++o) {
        const std::vector<int32_t>& from = sp->slices[o].send_rows;
        const std::vector<int32_t>& to = s.receive_rows[o];
        ASSERT_EQ(to.size(), from.size());
        for (size_t i = 0; i < to.size(); i += 2) {
          if (to[i] < 0) continue;
          ASSERT_TRUE(to[i] >= s.end && to[i] < s.key_rows_end) << "row position " << to[i];
          ASSERT_EQ(to[i + 1], from[i + 1]);
          const auto [it, fresh] = filled.insert({{to[i], to[i + 1]}, from[i]});
          ASSERT_TRUE(fresh || it->second == from[i]) << "row position " << to[i] << " twice";
        }
      }
      for (size_t i = 0; i < s.tiles.size(); ++i) {
        const GpuTile& t = s.tiles[i];
        const bool keyless = static_cast<int64_t>(i) < s.keyless.count;
        ASSERT_LE(t.count, keyless ? attention::KeylessTileRows(128) : 128);
        for (int row = 0; row < t.count; ++row) {
          const int64_t q = t.q_pos + static_cast<int64_t>(row) * t.q_stride;
          got.insert({q, t.head, keyless});
          ASSERT_TRUE(q >= s.begin && q < s.end) << "row " << q << " outside slice " << g;
          if (keyless) continue;  // attends to nothing
          for (int b = 0; b < p.num_branches; ++b) {
            int64_t first = 0, count = 0;
            if (!attention::BranchKeySpan(p, b, t.head, n, q, &first, &count)) continue;
            const attention::PackedKeys& pk = s.packed[static_cast<size_t>(b)];
            // The kernel's rule (PlanKeySpans): a packed span's keys are consecutive rows from
            // begin + (segment start - origin) / w * per_segment.
            const int64_t w = std::min(p.segment_length[b], n);
            const int64_t row0 = pk.begin + (first / w * w - pk.origin) / w * pk.per_segment;
            for (int64_t k = 0; k < count; ++k) {
              const int64_t key = first + k * attention::ClampedRate<int64_t>(p, b);
              if (p.causal && key > q) break;
              if (pk.begin < 0) {
                ASSERT_TRUE(key >= s.begin && key < s.end)
                    << "slice " << g << " reads key " << key << " of branch " << b
                    << " at its position, outside the slice";
                continue;
              }
              const auto it = filled.find({row0 + k, t.head});
              ASSERT_TRUE(it != filled.end() && it->second == key)
                  << "slice " << g << " reads key " << key << " of head " << t.head << " (branch "
                  << b << ", query " << q << ") from packed row position " << row0 + k
                  << ", which holds "
                  << (it == filled.end() ? std::string("nothing") : absl::StrCat(it->second));
            }
          }
        }
      }
    }
    EXPECT_EQ(got, want);
  }
}

// Without spanning branches a slice's parts are cut at multiples of every segment length, and
// each part then holds every row and key of the tiles that run in its launch (those whose first
// row it holds): the runner copies each part's inputs alone before its launch.
TEST(SequenceParallelPlan, PartsCutBySegmentsHoldEveryKeyOfTheirTiles) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  int cut = 0;
  for (int c = 0; c < 150; ++c) {
    RandomCase rc = DrawCuttableCase(rng, 3000);
    rc.shape.seq_lengths.resize(1);
    SCOPED_TRACE(rc.Describe());
    auto plan = attention::PlanAttention(rc.options, rc.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    auto sp = attention::PlanSequenceParallel(*plan, static_cast<int>(rng.Uniform(1, 3)), 128);
    ASSERT_TRUE(sp.ok()) << sp.status();
    const attention::DilatedAttentionParams& p = plan->params;
    const int64_t n = rc.shape.seq_lengths[0];
    for (const attention::SequenceSlicePlan& s : sp->slices) {
      const int parts = static_cast<int>(rng.Uniform(1, 4));
      bool by_segments = false;
      const auto ranges = attention::SliceParts(p, !sp->spanning_branches.empty(), s.begin, s.end,
                                                parts, &by_segments);
      ASSERT_EQ(static_cast<int64_t>(ranges.size()), std::min<int64_t>(parts, s.end - s.begin));
      int64_t at = s.begin;
      for (auto [b, e] : ranges) {
        EXPECT_EQ(b, at);
        EXPECT_LT(b, e);
        at = e;
      }
      EXPECT_EQ(at, s.end);
      if (!by_segments) continue;
      ++cut;
      EXPECT_TRUE(sp->spanning_branches.empty());
      for (size_t i = 0; i < s.tiles.size(); ++i) {
        const GpuTile& t = s.tiles[i];
        size_t part = 0;
        while (part + 1 < ranges.size() && t.q_pos >= ranges[part + 1].first) ++part;
        const auto [lo, hi] = ranges[part];
        for (int row = 0; row < t.count; ++row) {
          const int64_t q = t.q_pos + static_cast<int64_t>(row) * t.q_stride;
          ASSERT_TRUE(q >= lo && q < hi) << "row " << q << " outside part [" << lo << ", " << hi;
          if (static_cast<int64_t>(i) < s.keyless.count) continue;
          for (int br = 0; br < p.num_branches; ++br) {
            int64_t first = 0, count = 0;
            if (!attention::BranchKeySpan(p, br, t.head, n, q, &first, &count)) continue;
            const int64_t last = first + (count - 1) * attention::ClampedRate<int64_t>(p, br);
            ASSERT_TRUE(first >= lo && last < hi)
                << "query " << q << " reads keys " << first << ".." << last << " of branch " << br
                << " outside part [" << lo << ", " << hi << ")";
          }
        }
      }
    }
  }
  EXPECT_GT(cut, 20) << "too few slices were cut by segments to test anything";
}

// LongNet's widest branch has one segment, the whole sequence: each GPU holds its slice and that
// branch's kept rows (n / r per head), not K and V whole.
TEST(SequenceParallelPlan, AWholeSequenceBranchIsHeldPacked) {
  const int64_t n = 1 << 16;
  for (bool causal : {false, true}) {
    attention::AttentionOptions o;
    o.segment_lengths = {2048, 4096, n};
    o.dilation_rates = {1, 2, n / 2048};
    o.causal = causal;
    auto plan = attention::PlanAttention(
        o, attention::DenseShape(attention::DType::kBFloat16, 1, n, 4, 64));
    ASSERT_TRUE(plan.ok()) << plan.status();
    auto sp = attention::PlanSequenceParallel(*plan, 2, 128);
    ASSERT_TRUE(sp.ok()) << sp.status();
    ASSERT_EQ(sp->slices.size(), 2u);
    EXPECT_EQ(sp->spanning_branches, std::vector<int>{2});
    for (const auto& s : sp->slices) {
      EXPECT_EQ(s.end - s.begin, n / 2);
      EXPECT_EQ(s.packed[0].begin, -1);
      EXPECT_EQ(s.packed[1].begin, -1);
      EXPECT_EQ(s.packed[2].begin, s.end);
      EXPECT_EQ(s.packed[2].per_segment, 2048);
      EXPECT_EQ(s.key_rows_end - s.begin, n / 2 + 2048) << "K/V rows held";
    }
  }
}

// Segment lengths whose common multiple is longer than a slice's share: the slices stay as many
// as the GPUs and balanced, and the branch that would not align is exchanged instead.
TEST(SequenceParallelPlan, SegmentsWithoutACommonBoundaryStillSplitEvenly) {
  struct Case {
    int64_t n;
    int gpus;
    std::vector<int64_t> segments;
    std::vector<int> spanning;
  };
  const Case cases[] = {{1 << 19, 2, {2048, 3000}, {1}},
                        {1 << 20, 8, {2048, 3000}, {1}},
                        {1 << 20, 8, {1000, 2048}, {1}}};
  for (const Case& c : cases) {
    attention::AttentionOptions o;
    o.segment_lengths = c.segments;
    o.dilation_rates = {1, 2};
    auto plan = attention::PlanAttention(
        o, attention::DenseShape(attention::DType::kBFloat16, 1, c.n, 2, 64));
    ASSERT_TRUE(plan.ok()) << plan.status();
    auto sp = attention::PlanSequenceParallel(*plan, c.gpus, 128);
    ASSERT_TRUE(sp.ok()) << sp.status();
    SCOPED_TRACE(
        absl::StrCat("n=", c.n, " gpus=", c.gpus, " segments=", c.segments[0], ",", c.segments[1]));
    ASSERT_EQ(static_cast<int>(sp->slices.size()), c.gpus);
    const int64_t share = c.n / c.gpus;
    for (const auto& slice : sp->slices) {
      EXPECT_LE(slice.end - slice.begin, share + 2048)
          << "slice [" << slice.begin << ", " << slice.end << ")";
    }
    EXPECT_EQ(sp->spanning_branches, c.spanning);
  }
}

// What each GPU leases for a run (the server checks it against the pools before splitting):
// its slice of the four tensors where every segment fits a slice; with a rate-1 branch spanning
// slices, every GPU also holds that branch's keys packed, plus the exchange's buffers, which is
// more than the whole problem on one GPU.
TEST(SequenceParallelPlan, LeasesPerGpu) {
  const int64_t n = 1 << 14, heads = 2, dim = 64;
  const size_t row_bytes = heads * dim * 2;
  attention::AttentionOptions o;
  o.segment_lengths = {2048, 4096};
  o.dilation_rates = {1, 2};
  auto plan = attention::PlanAttention(
      o, attention::DenseShape(attention::DType::kBFloat16, 1, n, heads, dim));
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto sp = attention::PlanSequenceParallel(*plan, 2, 128);
  ASSERT_TRUE(sp.ok()) << sp.status();
  auto leases = attention::SequenceParallelLeases(*sp, *plan, 2);
  ASSERT_EQ(leases.size(), 2u);
  for (size_t g = 0; g < 2; ++g) {
    ASSERT_EQ(leases[g].size(), 5u) << "K, V, Q, O and the tile table";
    for (int t = 0; t < 4; ++t) EXPECT_EQ(leases[g][t], static_cast<size_t>(n / 2) * row_bytes);
    EXPECT_EQ(leases[g][4], 256 + 2 * sp->slices[g].tiles.size() * sizeof(GpuTile));
  }

  o.segment_lengths = {2048, n};
  o.dilation_rates = {1, 1};
  plan = attention::PlanAttention(
      o, attention::DenseShape(attention::DType::kBFloat16, 1, n, heads, dim));
  ASSERT_TRUE(plan.ok()) << plan.status();
  sp = attention::PlanSequenceParallel(*plan, 2, 128);
  ASSERT_TRUE(sp.ok()) << sp.status();
  ASSERT_EQ(sp->spanning_branches, std::vector<int>{1});
  leases = attention::SequenceParallelLeases(*sp, *plan, 2);
  const size_t one_gpu = 4 * static_cast<size_t>(n) * row_bytes;
  for (size_t g = 0; g < 2; ++g) {
    ASSERT_EQ(leases[g].size(), 9u) << "and the exchange's send, receive, rows and destinations";
    const size_t pack = static_cast<size_t>(sp->max_send_rows) * dim * 2;
    EXPECT_EQ(leases[g][4], 2 * pack);
    EXPECT_EQ(leases[g][5], 2 * pack * 2);
    size_t total = 0;
    for (size_t b : leases[g]) total += b;
    EXPECT_GT(total, one_gpu) << "GPU " << g;
  }
}

TEST(SequenceParallelPlan, OneSequenceOnly) {
  attention::AttentionOptions o;
  o.segment_lengths = {16};
  o.dilation_rates = {1};
  auto plan = attention::PlanAttention(o, attention::DenseShape(attention::DType::kBFloat16, 2, 64, 2, 64));
  ASSERT_TRUE(plan.ok());
  auto sp = attention::PlanSequenceParallel(*plan, 2, 128);
  EXPECT_EQ(sp.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dilattn::testing
