// The GPU kernel's work list, checked on the CPU: every (position, head) in exactly one tile, and
// every query of a tile attending to exactly the key spans of the tile's first query.

#include <map>
#include <set>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention/gpu_tiles.h"
#include "kernels/attention/tile_spans.h"
#include "tests/common/random_config.h"

namespace dilattn::attention {
namespace {

using Spans = std::vector<std::tuple<int, int64_t, int64_t>>;

Spans SpansOf(const DilatedAttentionParams& p, int64_t n, int head, int64_t pos) {
  Spans out;
  for (int b = 0; b < p.num_branches; ++b) {
    int64_t first = 0, count = 0;
    if (BranchKeySpan(p, b, head, n, pos, &first, &count)) out.emplace_back(b, first, count);
  }
  return out;
}

void CheckPlan(const AttentionPlan& plan, int block_m) {
  std::vector<GpuTile> tiles;
  ASSERT_TRUE(BuildGpuTiles(plan, block_m, &tiles).ok());
  const DilatedAttentionParams& p = plan.params;
  std::vector<int> seen(static_cast<size_t>(p.total_tokens * p.num_heads), 0);
  for (const GpuTile& t : tiles) {
    ASSERT_GE(t.count, 1);
    ASSERT_LE(t.count, block_m);
    ASSERT_GE(t.q_stride, 1);
    const int64_t base = plan.seq_offsets[t.seq];
    const int64_t n = plan.seq_offsets[t.seq + 1] - base;
    const Spans first = SpansOf(p, n, t.head, t.q_pos);
    for (int j = 0; j < t.count; ++j) {
      const int64_t pos = t.q_pos + static_cast<int64_t>(j) * t.q_stride;
      ASSERT_LT(pos, n);
      ++seen[static_cast<size_t>((base + pos) * p.num_heads + t.head)];
      ASSERT_EQ(SpansOf(p, n, t.head, pos), first) << "seq " << t.seq << " head " << t.head
                                                   << " pos " << pos << " vs " << t.q_pos;
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    ASSERT_EQ(seen[i], 1) << "token " << i / static_cast<size_t>(p.num_heads) << " head "
                          << i % static_cast<size_t>(p.num_heads);
  }
}

TEST(GpuTiles, CoverEveryRowOnceWithUniformKeySets) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  testing::SplitMix64 rng(seed);
  for (int i = 0; i < 300; ++i) {
    const testing::RandomCase c = testing::DrawCase(rng);
    SCOPED_TRACE(c.Describe());
    absl::StatusOr<AttentionPlan> plan = PlanAttention(c.options, c.shape);
    ASSERT_TRUE(plan.ok());
    CheckPlan(*plan, static_cast<int>(rng.Uniform(1, 3)) * 32);
  }
}

TEST(GpuTiles, LongNetConfigMakesFullTiles) {
  AttentionOptions o;
  o.segment_lengths = {2048, 4096, 8192};
  o.dilation_rates = {1, 2, 4};
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, DenseShape(DType::kFloat16, 1, 8192, 4, 64));
  ASSERT_TRUE(plan.ok());
  std::vector<GpuTile> tiles;
  ASSERT_TRUE(BuildGpuTiles(*plan, 64, &tiles).ok());
  // Cells of 2048 positions, 4 residues, 512 queries each: 8 full tiles per (cell, residue, head).
  EXPECT_EQ(tiles.size(), 4u * 4 * 8 * 4);
  for (const GpuTile& t : tiles) EXPECT_EQ(t.count, 64);
  CheckPlan(*plan, 64);
}

TEST(GpuTiles, RejectsWhatTheFieldsCannotHold) {
  AttentionOptions o;
  o.segment_lengths = {16};
  o.dilation_rates = {1};
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, DenseShape(DType::kFloat16, 1, 16, 40000, 8));
  ASSERT_TRUE(plan.ok());
  std::vector<GpuTile> tiles;
  EXPECT_EQ(BuildGpuTiles(*plan, 64, &tiles).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dilattn::attention
