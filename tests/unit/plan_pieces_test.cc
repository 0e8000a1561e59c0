// SplitIntoPieces: consecutive pieces cover the plan's rows, cut sequences only where no branch's
// segment crosses, and each piece computed alone (the CPU path, on the tensors' rows from its
// first) gives exactly the rows the whole plan gives. The GPU executor runs long jobs this way,
// so that a piece's kernel starts once its own inputs have arrived.

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention/attention.h"
#include "tests/common/random_config.h"
#include "tests/common/run_util.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {
namespace {

using attention::PlanPiece;

int64_t SegmentLcm(const attention::AttentionOptions& o) {
  int64_t unit = 1;
  for (int64_t w : o.segment_lengths) unit = std::lcm(unit, w);
  return unit;
}

TEST(PlanPieces, PiecesCoverTheRowsAndCutSequencesOnlyBetweenSegments) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  for (int c = 0; c < 400; ++c) {
    RandomCase rc = DrawCuttableCase(rng, 700);
    SCOPED_TRACE(rc.Describe());
    auto plan = attention::PlanAttention(rc.options, rc.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int64_t total = plan->params.total_tokens;
    const int64_t target = rng.Uniform(1, total + 10);
    SCOPED_TRACE(absl::StrCat("target ", target));
    const std::vector<PlanPiece> pieces = attention::SplitIntoPieces(*plan, target);
    ASSERT_FALSE(pieces.empty());
    const int64_t unit = SegmentLcm(rc.options);

    // Walk the plan's sequences alongside the pieces' sequences.
    size_t seq = 0;
    int64_t seq_start = 0, at = 0;
    for (const PlanPiece& piece : pieces) {
      EXPECT_EQ(piece.row_begin, at);
      EXPECT_GT(piece.row_end, piece.row_begin);
      EXPECT_EQ(piece.shape.num_heads, rc.shape.num_heads);
      EXPECT_EQ(piece.shape.head_dim, rc.shape.head_dim);
      EXPECT_EQ(piece.shape.dtype, rc.shape.dtype);
      int64_t rows = 0;
      for (int64_t n : piece.shape.seq_lengths) {
        ASSERT_LT(seq, rc.shape.seq_lengths.size());
        const int64_t len = rc.shape.seq_lengths[seq];
        // A piece's sequence starts where one of the plan's does or at a multiple of every
        // segment length from there, and ends inside that sequence.
        EXPECT_EQ((at - seq_start) % unit, 0) << "cut at " << at - seq_start << " of " << len;
        EXPECT_LE(at - seq_start + n, len);
        at += n;
        rows += n;
        if (at - seq_start == len) {
          seq_start = at;
          ++seq;
        }
      }
      EXPECT_EQ(rows, piece.row_end - piece.row_begin);
      if (piece.shape.seq_lengths.size() > 1) {
        EXPECT_LE(rows, target);
      }
    }
    EXPECT_EQ(at, total);
    EXPECT_EQ(seq, rc.shape.seq_lengths.size());
  }
}

TEST(PlanPieces, ALongSequenceIsCutIntoEqualPiecesOfOneShape) {
  attention::AttentionOptions o;
  o.segment_lengths = {2048, 4096, 8192};
  o.dilation_rates = {1, 2, 4};
  auto plan = attention::PlanAttention(
      o, attention::DenseShape(attention::DType::kBFloat16, 1, 8 * 32768 + 5000, 16, 64));
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::vector<PlanPiece> pieces = attention::SplitIntoPieces(*plan, 40000);
  // 32768-token pieces (the largest multiple of 8192 within 40000); the short rest of the
  // sequence joins the last one, as a sequence of its own.
  ASSERT_EQ(pieces.size(), 8u);
  for (size_t i = 0; i < pieces.size(); ++i) {
    EXPECT_EQ(pieces[i].row_begin, static_cast<int64_t>(i) * 32768);
    const std::vector<int64_t> want =
        i + 1 < pieces.size() ? std::vector<int64_t>{32768} : std::vector<int64_t>{32768, 5000};
    EXPECT_EQ(pieces[i].shape.seq_lengths, want);
  }

  // A branch as long as the sequence leaves nothing to cut at.
  o.segment_lengths.push_back(plan->params.total_tokens);
  o.dilation_rates.push_back(128);
  auto whole = attention::PlanAttention(o, plan->shape);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(attention::SplitIntoPieces(*whole, 40000).size(), 1u);
  // Nor a target that covers the plan.
  EXPECT_EQ(attention::SplitIntoPieces(*plan, plan->params.total_tokens).size(), 1u);
}

TEST(PlanPieces, TheCutUnitIsTheLcmOfTheSegmentLengthsWithinTheLimit) {
  attention::AttentionOptions o;
  o.segment_lengths = {2048, 3072, 8192};
  o.dilation_rates = {1, 2, 4};
  auto plan =
      attention::PlanAttention(o, attention::DenseShape(attention::DType::kFloat16, 1, 64, 2, 16));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(attention::SegmentCutUnit(plan->params, 24576), 24576);
  EXPECT_EQ(attention::SegmentCutUnit(plan->params, 24575), 0);
  // Segment lengths whose lcm overflows int64 on the way give 0, not a wrapped product.
  o.segment_lengths = {(int64_t{1} << 62) - 1, (int64_t{1} << 62) - 3};
  o.dilation_rates = {1, 1};
  auto huge = attention::PlanAttention(o, plan->shape);
  ASSERT_TRUE(huge.ok()) << huge.status();
  EXPECT_EQ(attention::SegmentCutUnit(huge->params, std::numeric_limits<int64_t>::max()), 0);
}

TEST(PlanPieces, EachPieceAloneGivesTheWholePlansRows) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  auto backends = AllCpuBackends(2);
  ASSERT_FALSE(backends.empty());
  attention::AttentionBackend& cpu = *backends.front();
  int cut = 0;
  for (int c = 0; c < 60; ++c) {
    RandomCase rc = DrawCuttableCase(rng, 400);
    SCOPED_TRACE(rc.Describe());
    auto plan = attention::PlanAttention(rc.options, rc.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int64_t total = plan->params.total_tokens;
    const int64_t target = rng.Uniform(1, total);
    const std::vector<PlanPiece> pieces = attention::SplitIntoPieces(*plan, target);
    cut += pieces.size() > 1;

    RandomInputs in = DrawInputs(rng, *plan, rc.input_scale);
    TypedBuffer whole(plan->shape.dtype, in.q.count());
    whole.Poison();
    ASSERT_TRUE(
        RunWithWorkspace(cpu, *plan, {in.q.cref(), in.k.cref(), in.v.cref(), whole.ref()}).ok());
    TypedBuffer parts(plan->shape.dtype, in.q.count());
    parts.Poison();
    const size_t row_bytes = plan->tensor_bytes / static_cast<size_t>(total);
    for (const PlanPiece& piece : pieces) {
      auto piece_plan = attention::PlanAttention(rc.options, piece.shape);
      ASSERT_TRUE(piece_plan.ok()) << piece_plan.status();
      const size_t at = static_cast<size_t>(piece.row_begin) * row_bytes;
      const size_t bytes = piece_plan->tensor_bytes;
      ASSERT_EQ(bytes, static_cast<size_t>(piece.row_end - piece.row_begin) * row_bytes);
      auto in_ref = [&](const TypedBuffer& t) {
        return attention::ConstTensorRef{static_cast<const unsigned char*>(t.cref().data) + at,
                                         bytes, DeviceLoc::Host()};
      };
      const attention::TensorRef out{static_cast<unsigned char*>(parts.data()) + at, bytes,
                                     DeviceLoc::Host()};
      ASSERT_TRUE(
          RunWithWorkspace(cpu, *piece_plan, {in_ref(in.q), in_ref(in.k), in_ref(in.v), out}).ok());
    }
    const ErrorReport e = RelativeError(parts.ToFloats(), whole.ToFloats());
    EXPECT_EQ(e.nan_count, 0u);
    EXPECT_LE(e.relative, 1e-6) << pieces.size() << " pieces of target " << target;
  }
  EXPECT_GT(cut, 20) << "too few cases were cut into pieces to test anything";
}

}  // namespace
}  // namespace dilattn::testing
