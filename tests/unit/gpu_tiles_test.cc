// The GPU kernel's work list, checked on the CPU: every (position, head) in exactly one tile, and
// every query of a tile attending to exactly the key spans of the tile's first query.

#include "kernels/attention/gpu_tiles.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
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
  KeylessPlacement keyless{-1, -1};
  ASSERT_TRUE(BuildGpuTiles(plan, block_m, &tiles, &keyless).ok());
  ASSERT_GE(keyless.count, 0);
  ASSERT_GE(keyless.period, 1);
  if (keyless.count > 0) {
    // All within the list, and none in its second half unless they outnumber the others.
    ASSERT_LT((keyless.count - 1) * keyless.period, static_cast<int64_t>(tiles.size()));
    if (keyless.period > 1) {
      ASSERT_LT((keyless.count - 1) * keyless.period, static_cast<int64_t>(tiles.size()) / 2);
    }
  }
  ASSERT_EQ(CountGpuTiles(plan, block_m), static_cast<int64_t>(tiles.size()));
  const DilatedAttentionParams& p = plan.params;
  std::vector<int> seen(static_cast<size_t>(p.total_tokens * p.num_heads), 0);
  for (size_t i = 0; i < tiles.size(); ++i) {
    const GpuTile& t = tiles[i];
    ASSERT_GE(t.q_stride, 1);
    const int64_t base = plan.seq_offsets[t.seq];
    const int64_t n = plan.seq_offsets[t.seq + 1] - base;
    const Spans first = SpansOf(p, n, t.head, t.q_pos);
    ASSERT_GE(t.count, 1);
    ASSERT_LE(t.count, first.empty() ? KeylessTileRows(block_m) : block_m);
    // Exactly the tiles at the keyless slots attend to no key.
    ASSERT_EQ(first.empty(), IsKeylessSlot(keyless, static_cast<int64_t>(i))) << "tile " << i;
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
  // Cells of 2048 positions; per head, the four residues modulo 4 form three key sets (r = 1
  // alone keeps two residues of one parity; the other two each add r = 2 or r = 2 and 4): one
  // progression of stride 2 (16 full tiles) and two of stride 4 (8 each) per (cell, head).
  EXPECT_EQ(tiles.size(), 4u * 4 * 32);
  std::map<std::pair<int, int>, int64_t> rows_by_head_stride;
  for (const GpuTile& t : tiles) {
    EXPECT_EQ(t.count, 64);
    rows_by_head_stride[{t.head, t.q_stride}] += t.count;
  }
  for (int h = 0; h < 4; ++h) {
    EXPECT_EQ((rows_by_head_stride[{h, 2}]), 4096) << "head " << h;
    EXPECT_EQ((rows_by_head_stride[{h, 4}]), 4096) << "head " << h;
  }
  CheckPlan(*plan, 64);
}

// Rates 1, 2, 4, 8 over 8 heads: head 0 keeps residues modulo 8 as {odd: r = 1 alone}, {2, 6},
// {0}, {4}; head 1 (offsets 0, 0, 1 for r = 2, 4, 8) as {0, 4}, {2, 6}, {1}, and r = 1 alone at
// {3, 7} and {5}: one key set that is no single progression, so it takes two, and no tile may
// mix key sets (CheckPlan).
TEST(GpuTiles, SplitsKeySetsIntoProgressions) {
  AttentionOptions o;
  o.segment_lengths = {1024, 2048, 4096, 8192};
  o.dilation_rates = {1, 2, 4, 8};
  o.causal = true;
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, DenseShape(DType::kFloat16, 1, 8192, 8, 64));
  ASSERT_TRUE(plan.ok());
  CheckPlan(*plan, 128);
  std::vector<GpuTile> tiles;
  ASSERT_TRUE(BuildGpuTiles(*plan, 128, &tiles).ok());
  std::map<std::pair<int, int>, int64_t> rows;  // (head, stride) -> queries
  for (const GpuTile& t : tiles) rows[{t.head, t.q_stride}] += t.count;
  EXPECT_EQ((rows[{0, 2}]), 4096);
  EXPECT_EQ((rows[{0, 4}]), 2048);
  EXPECT_EQ((rows[{0, 8}]), 2048);
  EXPECT_EQ((rows[{1, 2}]), 0);
  EXPECT_EQ((rows[{1, 4}]), 6144);
  EXPECT_EQ((rows[{1, 8}]), 2048);
}

// head_groups: a head of the r = 8 group keeps one residue in eight; the other seven are
// keyless, gathered into tall tiles, which the kernel only zeroes, spread over the list's first
// half between the tiles with keys.
TEST(GpuTiles, KeylessPositionsTakeTallTilesSpreadOverTheFirstHalf) {
  AttentionOptions o;
  o.mode = Mode::kHeadGroups;
  o.segment_lengths = {2048, 16384};
  o.dilation_rates = {1, 8};
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, DenseShape(DType::kBFloat16, 1, 16384, 4, 64));
  ASSERT_TRUE(plan.ok());
  CheckPlan(*plan, 128);
  std::vector<GpuTile> tiles;
  KeylessPlacement keyless;
  ASSERT_TRUE(BuildGpuTiles(*plan, 128, &tiles, &keyless).ok());
  // Heads 2 and 3 (r = 8, offset 1): keyless residues 0 mod 2 (8192 rows), 3 mod 4 (4096) and
  // 5 mod 8 (2048), in tiles of up to 2048 rows: 4 + 2 + 1 per head. Heads 0 and 1 (r = 1) take
  // 128 tiles each, heads 2 and 3 (2048 rows of stride 8) 16 each: 302 tiles, so a keyless one
  // every 302 / 2 / 14 = 10.
  EXPECT_EQ(keyless.count, 14);
  ASSERT_EQ(tiles.size(), 302u);
  EXPECT_EQ(keyless.period, 10);
  int64_t keyless_rows = 0;
  for (int64_t j = 0; j < keyless.count; ++j) {
    const GpuTile& t = tiles[static_cast<size_t>(j * keyless.period)];
    EXPECT_GE(t.head, 2);
    keyless_rows += t.count;
  }
  EXPECT_EQ(keyless_rows, 2 * 16384 * 7 / 8);
  // Between them, the tiles with keys keep their order: the costliest (r = 1, 2048 keys per
  // row at most) first.
  EXPECT_EQ(tiles[1].head, 0);
}

// Launches over parts of the rows: every tile in the part of its first row, a part's keyless
// tiles first and the rest in the list's order, every output row below a cut written by the parts
// up to it, and each part's Q reads below its q_end, which ascends and reaches its last row.
TEST(GpuTiles, CutIntoPartsByTheirFirstRows) {
  AttentionOptions o;
  o.mode = Mode::kHeadGroups;
  o.segment_lengths = {100, 300, 2000};
  o.dilation_rates = {1, 2, 4};
  o.causal = true;
  ProblemShape shape;
  shape.dtype = DType::kBFloat16;
  shape.num_heads = 6;
  shape.head_dim = 64;
  shape.seq_lengths = {1500, 37, 2200};
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, shape);
  ASSERT_TRUE(plan.ok());
  std::vector<GpuTile> tiles;
  KeylessPlacement keyless;
  ASSERT_TRUE(BuildGpuTiles(*plan, 128, &tiles, &keyless).ok());
  ASSERT_GT(keyless.count, 0);
  const int64_t total = plan->params.total_tokens;
  // Cuts inside sequences, and two empty parts.
  const std::vector<int64_t> cuts = {0, 400, 400, 1537, 2000, 3737, 3737};
  ASSERT_EQ(cuts.back(), total);
  std::vector<GpuTile> parted;
  const std::vector<TilePart> parts =
      CutTilesIntoParts(tiles, keyless, plan->seq_offsets, cuts, &parted);
  ASSERT_EQ(parts.size(), cuts.size() - 1);
  ASSERT_EQ(parted.size(), tiles.size());
  auto first_row = [&](const GpuTile& t) { return plan->seq_offsets[t.seq] + t.q_pos; };
  auto last_row = [&](const GpuTile& t) {
    return first_row(t) + static_cast<int64_t>(t.count - 1) * t.q_stride;
  };
  auto same = [](const GpuTile& a, const GpuTile& b) {
    return a.seq == b.seq && a.q_pos == b.q_pos && a.q_stride == b.q_stride && a.head == b.head &&
           a.count == b.count;
  };
  int64_t next = 0, keyless_total = 0, q_end = 0;
  std::vector<int> written(static_cast<size_t>(total * plan->params.num_heads), 0);
  for (size_t c = 0; c < parts.size(); ++c) {
    SCOPED_TRACE(absl::StrCat("part ", c));
    const TilePart& part = parts[c];
    ASSERT_EQ(part.tile_begin, next);
    ASSERT_GE(part.num_tiles, part.keyless);
    next += part.num_tiles;
    keyless_total += part.keyless;
    EXPECT_GE(part.q_end, q_end);
    EXPECT_GE(part.q_end, cuts[c + 1]);
    EXPECT_LE(part.q_end, total);
    q_end = part.q_end;
    size_t in_list = 0;  // the part's keyed tiles keep the list's order
    for (int64_t i = part.tile_begin; i < part.tile_begin + part.num_tiles; ++i) {
      const GpuTile& t = parted[static_cast<size_t>(i)];
      EXPECT_GE(first_row(t), cuts[c]);
      if (c + 1 < parts.size()) {
        EXPECT_LT(first_row(t), cuts[c + 1]);
      }
      const bool is_keyless = i < part.tile_begin + part.keyless;
      if (!is_keyless) {
        EXPECT_LT(last_row(t), part.q_end);
        while (in_list < tiles.size() && !same(tiles[in_list], t)) ++in_list;
        EXPECT_LT(in_list, tiles.size()) << "tile " << i << " out of the list's order";
      }
      // It is the tile at a keyless slot of the list exactly when it is among the part's first.
      size_t at = 0;
      while (at < tiles.size() && !same(tiles[at], t)) ++at;
      ASSERT_LT(at, tiles.size());
      EXPECT_EQ(IsKeylessSlot(keyless, static_cast<int64_t>(at)), is_keyless) << "tile " << i;
      for (int j = 0; j < t.count; ++j) {
        const int64_t row = first_row(t) + static_cast<int64_t>(j) * t.q_stride;
        ++written[static_cast<size_t>(row * plan->params.num_heads + t.head)];
      }
    }
    // Every row below the next cut is written by now.
    for (int64_t row = 0; row < cuts[c + 1]; ++row) {
      for (int h = 0; h < plan->params.num_heads; ++h) {
        ASSERT_EQ(written[static_cast<size_t>(row * plan->params.num_heads + h)], 1)
            << "row " << row << " head " << h;
      }
    }
  }
  EXPECT_EQ(next, static_cast<int64_t>(tiles.size()));
  EXPECT_EQ(keyless_total, keyless.count);
  EXPECT_EQ(parts[1].num_tiles, 0);
  EXPECT_EQ(parts[5].num_tiles, 0);
}

// With causal, a tile computes each branch's keys up to its last row, in 64-key tiles for all of
// its 128 rows. At the default longnet branches, tiles of one residue spanned a whole 2048-token
// cell, and computed 1.69 x the keys their queries see; merged progressions keep that at 1.28 x.
TEST(GpuTiles, CausalTilesComputeFewKeysTheirRowsDoNotSee) {
  AttentionOptions o;
  o.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  o.dilation_rates = {1, 2, 4, 8, 16};
  o.causal = true;
  const int64_t n = 32768;
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, DenseShape(DType::kBFloat16, 1, n, 16, 64));
  ASSERT_TRUE(plan.ok());
  const DilatedAttentionParams& p = plan->params;
  std::vector<GpuTile> tiles;
  ASSERT_TRUE(BuildGpuTiles(*plan, 128, &tiles).ok());
  double computed = 0;
  for (const GpuTile& t : tiles) {
    const int64_t q_last = t.q_pos + static_cast<int64_t>(t.count - 1) * t.q_stride;
    for (const auto& [b, first, count] : SpansOf(p, n, t.head, t.q_pos)) {
      const int64_t visible = std::min<int64_t>(count, (q_last - first) / p.dilation_rate[b] + 1);
      computed += 128.0 * 64 * static_cast<double>((visible + 63) / 64);
    }
  }
  double needed = 0;
  for (int h = 0; h < p.num_heads; ++h) {
    for (int64_t pos = 0; pos < n; ++pos) {
      for (const auto& [b, first, count] : SpansOf(p, n, h, pos)) {
        needed += static_cast<double>((pos - first) / p.dilation_rate[b] + 1);
      }
    }
  }
  EXPECT_LT(computed / needed, 1.3) << computed / needed;
}

// 1024 heads, each its own class (offsets h for r = 1024), and an lcm of 1024 over three
// branches: grouping every class would evaluate 3 M residue-branch pairs, past the planner's
// budget of 2 M, so the last classes are planned a residue per group (stride 1024). Both kinds
// must still cover every row once with uniform keys.
TEST(GpuTiles, GroupingPastItsBudgetStaysCorrect) {
  AttentionOptions o;
  o.segment_lengths = {1024, 2048, 4096};
  o.dilation_rates = {1, 2, 1024};
  absl::StatusOr<AttentionPlan> plan =
      PlanAttention(o, DenseShape(DType::kFloat16, 1, 4096, 1024, 16));
  ASSERT_TRUE(plan.ok());
  CheckPlan(*plan, 128);
  std::vector<GpuTile> tiles;
  ASSERT_TRUE(BuildGpuTiles(*plan, 128, &tiles).ok());
  std::set<int> grouped;  // heads with a progression wider than one residue
  for (const GpuTile& t : tiles) {
    if (t.q_stride < 1024) grouped.insert(t.head);
  }
  EXPECT_GT(grouped.size(), 0u);
  EXPECT_LT(grouped.size(), 1024u);
}

// LongNet's widest branch at 8M tokens and beyond: w = N with r = N / 2048 > 2048, the shortest
// segment, so each 2048-position cell holds at most one position it keeps. The other branches'
// residues still group into full tiles (modulo 2 here), and only the positions the wide branch
// keeps take tiles of their own; grouping modulo every rate would plan a tile per position.
// A 64K-token plan (H = 4) with branches (2048, 1), (4096, 2) and a wide one (65536, rate), its
// tiles checked for what the kernel relies on, and how many of them and of their rows hold
// positions the wide branch keeps.
struct WideBranchTiles {
  std::vector<GpuTile> tiles;
  int64_t wide_tiles = 0, wide_rows = 0;
};
WideBranchTiles PlanWideBranch(int64_t rate, bool causal) {
  SCOPED_TRACE(absl::StrCat("rate ", rate, " causal ", causal));
  AttentionOptions o;
  o.segment_lengths = {2048, 4096, 65536};
  o.dilation_rates = {1, 2, rate};
  o.causal = causal;
  absl::StatusOr<AttentionPlan> plan =
      PlanAttention(o, DenseShape(DType::kBFloat16, 1, 65536, 4, 64));
  WideBranchTiles w;
  EXPECT_TRUE(plan.ok());
  if (!plan.ok()) return w;
  CheckPlan(*plan, 128);
  EXPECT_TRUE(BuildGpuTiles(*plan, 128, &w.tiles).ok());
  for (const GpuTile& t : w.tiles) {
    const Spans spans = SpansOf(plan->params, 65536, t.head, t.q_pos);
    if (!spans.empty() && std::get<0>(spans.back()) == 2) {
      ++w.wide_tiles;
      w.wide_rows += t.count;
    }
  }
  return w;
}

TEST(GpuTiles, ARateWiderThanACellCutsOnlyItsPositionsOut) {
  for (bool causal : {false, true}) {
    const WideBranchTiles w = PlanWideBranch(8192, causal);
    // Per head, 65536 / 8192 positions kept by the wide branch, one tile each; the other rows
    // in tiles of up to 128, a progression cut in two at most once per cell (32 cells, two
    // progressions each).
    EXPECT_EQ(w.wide_tiles, 4 * 65536 / 8192);
    EXPECT_EQ(w.wide_rows, w.wide_tiles);
    EXPECT_LE(static_cast<int64_t>(w.tiles.size()), 4 * (65536 / 128 + 65536 / 8192 + 32 * 2));
  }
}

// A wide branch whose rate fits the cell keeps a few positions of each: cut out, they are a
// tile each; grouped modulo its rate, the class of residues it keeps splits into progressions
// of ever wider stride. The planner costs both and takes the cheaper: cutting where the branch
// keeps two positions per cell (LongNet's whole-sequence branch at N = 2M), grouping where it
// keeps 64.
TEST(GpuTiles, AWideBranchThatFitsTheCellIsCutOutWhereThatCostsLess) {
  for (const int64_t rate : {1024, 32}) {
    for (bool causal : {false, true}) {
      const WideBranchTiles w = PlanWideBranch(rate, causal);
      EXPECT_EQ(w.wide_rows, 4 * 65536 / rate);
      if (rate == 1024) {
        EXPECT_EQ(w.wide_tiles, w.wide_rows) << "not cut out, causal " << causal;
      } else {
        EXPECT_LE(w.wide_tiles, w.wide_rows / 64) << "cut out, causal " << causal;
      }
    }
  }
}

// Rates up to the largest segment length are valid (PlanAttention), far beyond any position:
// finding the positions such a branch keeps in a cell must not overflow.
TEST(GpuTiles, RatesBeyondEveryPositionPlanAsOnePositionPerSegment) {
  for (bool causal : {false, true}) {
    AttentionOptions o;
    o.segment_lengths = {2048, std::numeric_limits<int64_t>::max()};
    o.dilation_rates = {1, std::numeric_limits<int64_t>::max()};
    o.causal = causal;
    absl::StatusOr<AttentionPlan> plan =
        PlanAttention(o, DenseShape(DType::kBFloat16, 1, 8192, 4, 64));
    ASSERT_TRUE(plan.ok()) << plan.status();
    CheckPlan(*plan, 128);
  }
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

// A batch of `seqs` 64-token sequences under the default model's branches, and its key.
AttentionPlan SmallBatch(int seqs) {
  AttentionOptions o;
  o.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  o.dilation_rates = {1, 2, 4, 8, 16};
  absl::StatusOr<AttentionPlan> plan =
      PlanAttention(o, DenseShape(DType::kFloat16, seqs, 64, 4, 32));
  EXPECT_TRUE(plan.ok()) << plan.status();
  return *std::move(plan);
}

void ExpectSameList(const GpuTileCache::List& got, const AttentionPlan& plan, int block_m) {
  std::vector<GpuTile> tiles;
  KeylessPlacement keyless;
  ASSERT_TRUE(BuildGpuTiles(plan, block_m, &tiles, &keyless).ok());
  ASSERT_EQ(got.tiles.size(), tiles.size());
  for (size_t i = 0; i < tiles.size(); ++i) {
    const GpuTile& a = got.tiles[i];
    const GpuTile& b = tiles[i];
    ASSERT_EQ(std::tie(a.seq, a.q_pos, a.q_stride, a.head, a.count),
              std::tie(b.seq, b.q_pos, b.q_stride, b.head, b.count))
        << "tile " << i;
  }
  EXPECT_EQ(got.keyless.count, keyless.count);
  EXPECT_EQ(got.keyless.period, keyless.period);
}

// A shape seen before gets its list back without planning; the list is BuildGpuTiles' own, and
// the tile height is part of the key.
TEST(GpuTileCache, ReturnsTheBuiltListAndKeepsIt) {
  GpuTileCache cache;
  const AttentionPlan a = SmallBatch(3), b = SmallBatch(5);
  absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> first = cache.Get("3", a, 128);
  ASSERT_TRUE(first.ok()) << first.status();
  ExpectSameList(**first, a, 128);
  absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> again = cache.Get("3", a, 128);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->get(), first->get());
  absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> other = cache.Get("5", b, 128);
  ASSERT_TRUE(other.ok());
  ExpectSameList(**other, b, 128);
  absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> lower = cache.Get("3", a, 64);
  ASSERT_TRUE(lower.ok());
  ExpectSameList(**lower, a, 64);
  const GpuTileCache::Stats s = cache.stats();
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 3u);
  EXPECT_EQ(s.entries, 3u);
  EXPECT_EQ(s.bytes, sizeof(GpuTile) * ((*first)->tiles.size() + (*other)->tiles.size() +
                                        (*lower)->tiles.size()));
  // An idle release drops them all; the lists handed out stay valid.
  EXPECT_EQ(cache.Clear(), s.bytes);
  EXPECT_EQ(cache.stats().entries, 0u);
  EXPECT_EQ(cache.stats().bytes, 0u);
  ExpectSameList(**first, a, 128);
  ASSERT_TRUE(cache.Get("3", a, 128).ok());
  EXPECT_EQ(cache.stats().misses, 4u);
}

// The least recently used list goes first, within both the entry and the byte limit; a list
// larger than the byte limit is returned and not kept.
TEST(GpuTileCache, EvictsTheLeastRecentlyUsedWithinItsLimits) {
  const AttentionPlan a = SmallBatch(1), b = SmallBatch(2), c = SmallBatch(3);
  GpuTileCache two(2);
  ASSERT_TRUE(two.Get("a", a, 128).ok());
  ASSERT_TRUE(two.Get("b", b, 128).ok());
  ASSERT_TRUE(two.Get("a", a, 128).ok());  // a is now the most recent
  ASSERT_TRUE(two.Get("c", c, 128).ok());  // b goes
  EXPECT_EQ(two.stats().entries, 2u);
  const uint64_t misses = two.stats().misses;
  ASSERT_TRUE(two.Get("a", a, 128).ok());
  ASSERT_TRUE(two.Get("c", c, 128).ok());
  EXPECT_EQ(two.stats().misses, misses);
  ASSERT_TRUE(two.Get("b", b, 128).ok());
  EXPECT_EQ(two.stats().misses, misses + 1);

  absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> one =
      GpuTileCache(64, 0).Get("c", c, 128);
  ASSERT_TRUE(one.ok());
  ExpectSameList(**one, c, 128);
  GpuTileCache small(64, sizeof(GpuTile) * (*one)->tiles.size() - 1);
  ASSERT_TRUE(small.Get("c", c, 128).ok());
  EXPECT_EQ(small.stats().entries, 0u);
  EXPECT_EQ(small.stats().bytes, 0u);
}

// A plan the tiles cannot describe gets BuildGpuTiles' error, and nothing is kept for it.
TEST(GpuTileCache, PassesErrorsOnAndKeepsNothingForThem) {
  AttentionOptions o;
  o.segment_lengths = {16};
  o.dilation_rates = {1};
  absl::StatusOr<AttentionPlan> plan =
      PlanAttention(o, DenseShape(DType::kFloat16, 1, 16, 40000, 8));
  ASSERT_TRUE(plan.ok());
  GpuTileCache cache;
  EXPECT_EQ(cache.Get("wide", *plan, 64).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache.stats().entries, 0u);
}

// Threads asking for a few shapes at once, with evictions among them, each get the right list
// (run under ThreadSanitizer in CI).
TEST(GpuTileCache, ConcurrentCallersGetTheRightLists) {
  GpuTileCache cache(3);
  std::vector<AttentionPlan> plans;
  for (int seqs = 1; seqs <= 5; ++seqs) plans.push_back(SmallBatch(seqs));
  std::vector<size_t> sizes;
  for (const AttentionPlan& p : plans) {
    std::vector<GpuTile> tiles;
    ASSERT_TRUE(BuildGpuTiles(p, 128, &tiles).ok());
    sizes.push_back(tiles.size());
  }
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 60; ++i) {
        const size_t k = static_cast<size_t>((i * 7 + t) % 5);
        absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> list =
            cache.Get(std::to_string(k), plans[k], 128);
        if (!list.ok() || (*list)->tiles.size() != sizes[k] ||
            (*list)->tiles.back().seq >= static_cast<int32_t>(k + 1)) {
          wrong.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_LE(cache.stats().entries, 3u);
  EXPECT_EQ(cache.stats().hits + cache.stats().misses, 360u);
}

}  // namespace
}  // namespace dilattn::attention
