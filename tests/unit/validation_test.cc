// Every rejection of DESIGN.md section 1: INVALID_ARGUMENT, with the field and its values named.

#include <atomic>
#include <cmath>
#include <limits>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cpu/tile_runner.h"
#include "tests/common/run_util.h"
#include "tests/common/test_util.h"

namespace dilattn::attention {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

AttentionOptions Options(std::vector<int64_t> w, std::vector<int64_t> r) {
  AttentionOptions o;
  o.segment_lengths = std::move(w);
  o.dilation_rates = std::move(r);
  return o;
}

void ExpectInvalid(const AttentionOptions& o, const ProblemShape& s,
                   const ::testing::Matcher<std::string>& message) {
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, s);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << plan.status();
  EXPECT_THAT(std::string(plan.status().message()), message);
}

const ProblemShape kShape = DenseShape(DType::kFloat32, 2, 64, 4, 16);

TEST(Validation, AcceptsAValidConfiguration) {
  absl::StatusOr<AttentionPlan> plan = PlanAttention(Options({16, 32}, {1, 2}), kShape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->tensor_bytes, 2u * 64 * 4 * 16 * 4);
  EXPECT_EQ(plan->seq_offsets, (std::vector<int64_t>{0, 64, 128}));
  EXPECT_FLOAT_EQ(plan->params.scale, 0.25f);
}

TEST(Validation, BranchLists) {
  ExpectInvalid(Options({}, {}), kShape, HasSubstr("non-empty"));
  ExpectInvalid(Options({16, 32}, {1}), kShape,
                AllOf(HasSubstr("segment_lengths has 2"), HasSubstr("dilation_rates has 1")));
  ExpectInvalid(Options(std::vector<int64_t>(17, 4), std::vector<int64_t>(17, 1)), kShape,
                HasSubstr("at most 16 branches"));
  ExpectInvalid(Options({16, 0}, {1, 1}), kShape, HasSubstr("segment_lengths[1]=0"));
  ExpectInvalid(Options({16, -3}, {1, 1}), kShape, HasSubstr("segment_lengths[1]=-3"));
  ExpectInvalid(Options({16, 4}, {1, 8}), kShape,
                AllOf(HasSubstr("dilation_rates[1]=8"), HasSubstr("segment_lengths[1]=4")));
  ExpectInvalid(Options({16}, {0}), kShape, HasSubstr("dilation_rates[0]=0"));
}

TEST(Validation, HeadGroupsNeedEnoughHeads) {
  AttentionOptions o = Options({16, 32, 64}, {1, 2, 4});
  o.mode = Mode::kHeadGroups;
  ExpectInvalid(o, DenseShape(DType::kFloat32, 1, 64, 2, 16),
                AllOf(HasSubstr("head_groups"), HasSubstr("num_heads=2"), HasSubstr("3 branches")));
}

TEST(Validation, Dimensions) {
  ExpectInvalid(Options({16}, {1}), DenseShape(DType::kFloat32, 0, 64, 4, 16),
                HasSubstr("batch size (B) must be >= 1"));
  ExpectInvalid(Options({16}, {1}), DenseShape(DType::kFloat32, 1, 0, 4, 16),
                HasSubstr("sequence length (N) must be >= 1, got 0"));
  ExpectInvalid(Options({16}, {1}), DenseShape(DType::kFloat32, 1, 64, 0, 16),
                HasSubstr("num_heads (H)"));
  ExpectInvalid(Options({16}, {1}), DenseShape(DType::kFloat32, 1, 64, 4, 0),
                HasSubstr("head_dim (D)"));
  ExpectInvalid(Options({16}, {1}), DenseShape(DType::kFloat32, 1, int64_t{1} << 40, 1 << 20, 1 << 20),
                HasSubstr("overflows"));
}

TEST(Validation, Scale) {
  AttentionOptions o = Options({16}, {1});
  for (double bad : {0.0, -1.0, std::numeric_limits<double>::infinity(),
                     std::numeric_limits<double>::quiet_NaN()}) {
    o.softmax_scale = bad;
    ExpectInvalid(o, kShape, HasSubstr("softmax_scale"));
  }
  o.softmax_scale = 1e-300;  // positive, but zero in fp32
  ExpectInvalid(o, kShape, HasSubstr("softmax_scale"));
  // Past 1e6 the scores of fp16 inputs could overflow fp32 (the softmax of inf is NaN).
  o.softmax_scale = 1e37;
  ExpectInvalid(o, kShape, HasSubstr("softmax_scale 1e+37 exceeds 1e+06"));
  o.softmax_scale = kMaxSoftmaxScale;
  EXPECT_TRUE(PlanAttention(o, kShape).ok());
}

TEST(Validation, TensorBytesAndLocation) {
  absl::StatusOr<AttentionPlan> plan = PlanAttention(Options({16}, {1}), kShape);
  ASSERT_TRUE(plan.ok());
  testing::TypedBuffer good(DType::kFloat32, 2 * 64 * 4 * 16);
  testing::TypedBuffer short_buffer(DType::kFloat32, 2 * 64 * 4 * 16 - 1);
  testing::TypedBuffer out(DType::kFloat32, 2 * 64 * 4 * 16);
  absl::Status s = CheckTensors(*plan, {good.cref(), short_buffer.cref(), good.cref(), out.ref()},
                                DeviceLoc::Host());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), AllOf(HasSubstr("K holds 32764 bytes"),
                                              HasSubstr("needs 32768")));
  ConstTensorRef on_gpu = good.cref();
  on_gpu.location = DeviceLoc::Cuda(0);
  s = CheckTensors(*plan, {on_gpu, good.cref(), good.cref(), out.ref()}, DeviceLoc::Host());
  EXPECT_THAT(std::string(s.message()), AllOf(HasSubstr("Q lives on cuda:0"), HasSubstr("host")));
}

TEST(Validation, TensorAlignmentAndOverlap) {
  absl::StatusOr<AttentionPlan> plan = PlanAttention(Options({16}, {1}), kShape);
  ASSERT_TRUE(plan.ok());
  const size_t bytes = plan->tensor_bytes;
  testing::TypedBuffer good(DType::kFloat32, 2 * 64 * 4 * 16);
  testing::TypedBuffer out(DType::kFloat32, 2 * 64 * 4 * 16);
  testing::TypedBuffer wide(DType::kFloat32, 2 * 2 * 64 * 4 * 16);
  // K = V is fine: inputs may share memory.
  EXPECT_TRUE(CheckTensors(*plan, {good.cref(), good.cref(), good.cref(), out.ref()},
                           DeviceLoc::Host())
                  .ok());
  const auto* base = static_cast<const char*>(wide.cref().data);
  const ConstTensorRef odd{base + 2, bytes, DeviceLoc::Host()};
  absl::Status s =
      CheckTensors(*plan, {good.cref(), odd, good.cref(), out.ref()}, DeviceLoc::Host());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("K at address"), HasSubstr("not aligned to its 4-byte elements")));
  // O over an input, also by one element.
  const TensorRef o_over_q{const_cast<char*>(base) + bytes - 4, bytes, DeviceLoc::Host()};
  const ConstTensorRef q{base, bytes, DeviceLoc::Host()};
  s = CheckTensors(*plan, {q, good.cref(), good.cref(), o_over_q}, DeviceLoc::Host());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("O overlaps Q"));
  const TensorRef o_after_q{const_cast<char*>(base) + bytes, bytes, DeviceLoc::Host()};
  EXPECT_TRUE(CheckTensors(*plan, {q, good.cref(), good.cref(), o_after_q}, DeviceLoc::Host()).ok());
}

TEST(Validation, CpuBackendRejectsHugeHeadDim) {
  auto backend = CreateCpuBackend({1, "generic"});
  ASSERT_TRUE(backend.ok());
  absl::StatusOr<AttentionPlan> plan =
      PlanAttention(Options({16}, {1}), DenseShape(DType::kFloat32, 1, 16, 1, 300));
  ASSERT_TRUE(plan.ok());
  const absl::Status s = (*backend)->Supports(*plan);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("head_dim D=300"));
  testing::TypedBuffer t(DType::kFloat32, 16 * 300);
  EXPECT_EQ(testing::RunWithWorkspace(**backend, *plan, {t.cref(), t.cref(), t.cref(), t.ref()})
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// Rates may be as large as their segment lengths, up to the largest int64: each head then keeps
// one position per segment at offset h (ceil(H / r) = 1), and the CPU path runs such a plan.
TEST(Validation, RatesUpToTheLargestSegmentLength) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  absl::StatusOr<AttentionPlan> plan = PlanAttention(Options({16, kMax}, {1, kMax}), kShape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->params.offset_divisor[0], 4);
  EXPECT_EQ(plan->params.offset_divisor[1], 1);
  auto backend = CreateCpuBackend({1, "generic"});
  ASSERT_TRUE(backend.ok());
  testing::TypedBuffer t(DType::kFloat32, 2 * 64 * 4 * 16), o(DType::kFloat32, 2 * 64 * 4 * 16);
  EXPECT_TRUE(
      testing::RunWithWorkspace(**backend, *plan, {t.cref(), t.cref(), t.cref(), o.ref()}).ok());
}

// One-token segments over 2^26 positions x heads: more key spans than the CPU path lists (it
// would take gigabytes for them, and past 2^31 its 32-bit span index would wrap). Refused by its
// selector, so Supports and Run agree.
TEST(Validation, CpuBackendRefusesMoreSpansThanItIndexes) {
  auto backend = CreateCpuBackend({1, "generic"});
  ASSERT_TRUE(backend.ok());
  absl::StatusOr<AttentionPlan> fits =
      PlanAttention(Options({1}, {1}), DenseShape(DType::kFloat16, 1, int64_t{1} << 25, 2, 1));
  ASSERT_TRUE(fits.ok()) << fits.status();
  EXPECT_TRUE((*backend)->Supports(*fits).ok());
  absl::StatusOr<AttentionPlan> plan = PlanAttention(
      Options({1}, {1}), DenseShape(DType::kFloat16, 1, (int64_t{1} << 25) + 1, 2, 1));
  ASSERT_TRUE(plan.ok()) << plan.status();
  absl::Status s = (*backend)->Supports(*plan);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("spans, more than the cpu backend lists"));
}

// An executor stops a job whose requests were all cancelled: under a ScopedStopCheck that says
// stop, the CPU path starts no tile, so no output row is computed (rows stay poisoned, or hold
// the zeros a multi-pass run starts from); once the scope ends, the same run computes them all.
// The check is asked from the workers' threads.
TEST(Validation, CpuRunsStopWhenTheirCheckSaysSo) {
  auto backend = CreateCpuBackend({2, "generic"});
  ASSERT_TRUE(backend.ok());
  absl::StatusOr<AttentionPlan> plan =
      PlanAttention(Options({64, 128}, {1, 2}), DenseShape(DType::kFloat32, 2, 256, 2, 16));
  ASSERT_TRUE(plan.ok()) << plan.status();
  const size_t n = 2 * 256 * 2 * 16;
  testing::TypedBuffer x(DType::kFloat32, n), o(DType::kFloat32, n);
  for (size_t i = 0; i < n; ++i) x.Set(i, 0.01f * static_cast<float>(i % 97) + 0.5f);
  auto run = [&] {
    o.Poison();
    ASSERT_TRUE(
        testing::RunWithWorkspace(**backend, *plan, {x.cref(), x.cref(), x.cref(), o.ref()}).ok());
  };
  run();
  const std::vector<float> want = o.ToFloats();
  auto computed = [&] {
    size_t same = 0;
    const std::vector<float> got = o.ToFloats();
    for (size_t i = 0; i < n; ++i) same += got[i] == want[i] ? 1 : 0;
    return same;
  };
  ASSERT_EQ(computed(), n);
  std::atomic<int> asked{0};
  {
    cpu::ScopedStopCheck stop([&] {
      asked.fetch_add(1);
      return true;
    });
    run();
    EXPECT_EQ(computed(), 0u) << "a stopped run computed rows";
    EXPECT_GT(asked.load(), 0);
  }
  {
    cpu::ScopedStopCheck keep_going([] { return false; });
    run();
    EXPECT_EQ(computed(), n);
  }
  run();
  EXPECT_EQ(computed(), n) << "the check outlived its scope";
}

TEST(Validation, CpuBackendOptions) {
  EXPECT_EQ(CreateCpuBackend({1, "sse9"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateCpuBackend({-2, "auto"}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Validation, ParseNames) {
  EXPECT_EQ(*ParseMode("longnet"), Mode::kLongNet);
  EXPECT_EQ(*ParseMode("HEAD_GROUPS"), Mode::kHeadGroups);
  EXPECT_THAT(std::string(ParseMode("ring").status().message()), HasSubstr("'ring'"));
  EXPECT_EQ(*ParseDType("FP16"), DType::kFloat16);
  EXPECT_EQ(*ParseDType("bf16"), DType::kBFloat16);
  EXPECT_EQ(ParseDType("INT8").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Validation, FlopsFollowTheDesignFormula) {
  AttentionOptions o = Options({512, 1024}, {1, 2});
  absl::StatusOr<AttentionPlan> plan = PlanAttention(o, DenseShape(DType::kFloat16, 1, 2048, 8, 64));
  ASSERT_TRUE(plan.ok());
  EXPECT_DOUBLE_EQ(plan->flops, 8.0 * (4.0 * 2048 * 512 * 64 + 4.0 * 2048 * 1024 * 64 / 4));
  o.causal = true;
  o.mode = Mode::kHeadGroups;
  plan = PlanAttention(o, DenseShape(DType::kFloat16, 1, 2048, 3, 64));  // groups of 2 and 1
  ASSERT_TRUE(plan.ok());
  EXPECT_DOUBLE_EQ(plan->flops, (2.0 * 4 * 2048 * 512 * 64 + 4.0 * 2048 * 1024 * 64 / 4) / 2);
}

}  // namespace
}  // namespace dilattn::attention
