// The native stream's stretches: each must start on a segment boundary of every branch, so that
// a stretch computed alone gives exactly the whole sequence's output for its tokens.

#include <cstdint>

#include "gtest/gtest.h"
#include "server/grpc/attend_service.h"

namespace dilattn::server {
namespace {

OperatorOptions Dilated(std::vector<int64_t> segments) {
  OperatorOptions o;
  o.dilated.segment_lengths = std::move(segments);
  o.dilated.dilation_rates.assign(o.dilated.segment_lengths.size(), 1);
  return o;
}

TEST(Stretch, LeastCommonMultipleOfTheSegments) {
  EXPECT_EQ(StretchTokens(Dilated({2048, 4096, 8192, 16384, 32768}), 1 << 20), 32768);
  EXPECT_EQ(StretchTokens(Dilated({16, 48, 24}), 200), 48);
  EXPECT_EQ(StretchTokens(Dilated({6, 10}), 1000), 30);
}

TEST(Stretch, CappedAtTheSequence) {
  // Segments beyond N are cut to N, and so is a multiple that reaches past N.
  EXPECT_EQ(StretchTokens(Dilated({2048, 4096, 8192, 16384, 32768}), 10000), 10000);
  EXPECT_EQ(StretchTokens(Dilated({500}), 200), 200);
  EXPECT_EQ(StretchTokens(Dilated({7, 11, 13}), 500), 500);
  // No overflow on the way: huge segments stop the product at N.
  EXPECT_EQ(StretchTokens(Dilated({(int64_t{1} << 40) - 1, (int64_t{1} << 40) - 3}), 1 << 30),
            1 << 30);
}

TEST(Stretch, BlockSparseTakesTheWholeSequence) {
  OperatorOptions o;
  o.kind = OperatorKind::kBlockSparse;
  EXPECT_EQ(StretchTokens(o, 4096), 4096);
}

}  // namespace
}  // namespace dilattn::server
