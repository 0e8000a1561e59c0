// The CPU backends and the reference against the naive implementation on random configurations:
// modes, causal, ragged batches, uneven head groups, head dims from 1 to 128, every dtype; and
// head dims from 129 to 256, the rest of the CPU path's range.

#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/reference.h"
#include "tests/common/random_config.h"
#include "tests/common/run_util.h"

namespace dilattn::testing {
namespace {

constexpr int kConfigs = 240;

// A planned case's fresh random inputs, its output buffer and the naive float64 output.
struct Checked {
  Checked(SplitMix64& rng, const attention::AttentionPlan& plan, float input_scale)
      : in(DrawInputs(rng, plan, input_scale)),
        expected(NaiveAttention(plan, in.q, in.k, in.v)),
        o(plan.shape.dtype, in.q.count()) {}
  attention::AttentionTensors tensors() { return {in.q.cref(), in.k.cref(), in.v.cref(), o.ref()}; }

  RandomInputs in;
  std::vector<double> expected;
  TypedBuffer o;
};

TEST(CpuAttentionRandom, MatchesNaiveImplementation) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  auto backends = AllCpuBackends(/*threads=*/3);
  ASSERT_FALSE(backends.empty());
  int failures = 0;
  for (int i = 0; i < kConfigs && failures < 5; ++i) {
    const RandomCase c = DrawCase(rng);
    SCOPED_TRACE(absl::StrCat("config ", i, ": ", c.Describe()));
    absl::StatusOr<attention::AttentionPlan> plan = attention::PlanAttention(c.options, c.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    Checked run(rng, *plan, c.input_scale);
    const attention::AttentionTensors tensors = run.tensors();
    const double tolerance = Tolerance(c.shape.dtype);

    run.o.Poison();
    ASSERT_TRUE(attention::ReferenceAttention(*plan, tensors).ok());
    ErrorReport err = RelativeError(run.o.ToFloats(), run.expected);
    if (!err.ok(tolerance)) ++failures;
    EXPECT_TRUE(err.ok(tolerance)) << "reference: rel " << err.relative << ", non-finite "
                                   << err.nan_count;
    for (auto& backend : backends) {
      run.o.Poison();
      absl::Status s = RunWithWorkspace(*backend, *plan, tensors);
      ASSERT_TRUE(s.ok()) << s;
      err = RelativeError(run.o.ToFloats(), run.expected);
      if (!err.ok(tolerance)) ++failures;
      EXPECT_TRUE(err.ok(tolerance)) << backend->name() << ": rel " << err.relative
                                     << ", non-finite " << err.nan_count;
    }
  }
}

// The CPU path takes head dims up to 256 where the random configurations above stop at 128: the
// widest, and ones that leave part of a vector (200: half an AVX-512 vector; 255: part of every
// width). Short sequences and few heads keep the naive float64 implementation fast.
TEST(CpuAttentionRandom, HeadDimsPast128MatchNaiveImplementation) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  auto backends = AllCpuBackends(/*threads=*/3);
  ASSERT_FALSE(backends.empty());
  for (const int64_t dim : {200, 255, 256}) {
    for (const attention::DType dtype :
         {attention::DType::kFloat32, attention::DType::kFloat16, attention::DType::kBFloat16}) {
      RandomCaseLimits limits;
      limits.max_seq_len = 96;
      limits.max_heads = 3;
      limits.head_dims = {dim};
      limits.dtypes = {dtype};
      const RandomCase c = DrawCase(rng, limits);
      SCOPED_TRACE(c.Describe());
      absl::StatusOr<attention::AttentionPlan> plan = attention::PlanAttention(c.options, c.shape);
      ASSERT_TRUE(plan.ok()) << plan.status();
      Checked run(rng, *plan, c.input_scale);
      const double tolerance = Tolerance(c.shape.dtype);
      for (auto& backend : backends) {
        run.o.Poison();
        absl::Status s = RunWithWorkspace(*backend, *plan, run.tensors());
        ASSERT_TRUE(s.ok()) << backend->name() << ": " << s;
        const ErrorReport err = RelativeError(run.o.ToFloats(), run.expected);
        EXPECT_TRUE(err.ok(tolerance))
            << backend->name() << ": rel " << err.relative << ", non-finite " << err.nan_count;
      }
    }
  }
}

// Uncovered (position, head) rows are exactly zero, not merely small.
TEST(CpuAttentionRandom, UncoveredRowsAreExactlyZero) {
  attention::AttentionOptions options;
  options.segment_lengths = {16};
  options.dilation_rates = {4};
  options.causal = true;
  const auto shape = attention::DenseShape(attention::DType::kFloat32, 1, 64, 2, 8);
  absl::StatusOr<attention::AttentionPlan> plan = attention::PlanAttention(options, shape);
  ASSERT_TRUE(plan.ok());
  SplitMix64 rng(TestSeed());
  const RandomInputs in = DrawInputs(rng, *plan, 1.0f);
  TypedBuffer o(attention::DType::kFloat32, in.q.count());
  for (auto& backend : AllCpuBackends(2)) {
    o.Poison();
    ASSERT_TRUE(RunWithWorkspace(*backend, *plan,
                                 {in.q.cref(), in.k.cref(), in.v.cref(), o.ref()})
                    .ok());
    for (int64_t p = 0; p < 64; ++p) {
      for (int64_t h = 0; h < 2; ++h) {
        // H=2, r=4: offsets 0 and 1; position p is kept by head h when p % 4 == h.
        if (p % 16 % 4 == h) continue;
        for (int64_t d = 0; d < 8; ++d) {
          ASSERT_EQ(o.Get(static_cast<size_t>((p * 2 + h) * 8 + d)), 0.0f)
              << backend->name() << " p=" << p << " h=" << h;
        }
      }
    }
  }
}

}  // namespace
}  // namespace dilattn::testing
