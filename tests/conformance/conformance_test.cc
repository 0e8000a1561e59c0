// Every case of ../shared/conformance through the float64 reference and every CPU instruction
// set, at fp32, fp16 and bf16, against the stored float64-derived outputs.

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/reference.h"
#include "tests/common/conformance.h"
#include "tests/common/run_util.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {
namespace {

using attention::DType;

std::vector<ConformanceCase> Cases() {
  absl::StatusOr<std::vector<ConformanceCase>> cases = LoadConformanceCases();
  if (!cases.ok()) {
    ConformanceCase broken;
    broken.name = "load_failure";
    broken.expect_error = std::string(cases.status().message());
    return {broken};
  }
  return *cases;
}

class ConformanceTest : public ::testing::TestWithParam<ConformanceCase> {};

TEST_P(ConformanceTest, MatchesExpectedOutput) {
  const ConformanceCase& c = GetParam();
  ASSERT_NE(c.name, "load_failure") << "cannot load conformance cases from " << ConformanceDir()
                                    << ": " << c.expect_error;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    const attention::ProblemShape shape =
        attention::DenseShape(dtype, c.batch, c.seq_len, c.heads, c.head_dim);
    absl::StatusOr<attention::AttentionPlan> plan = attention::PlanAttention(c.options, shape);
    if (!c.expect_error.empty()) {
      ASSERT_FALSE(plan.ok()) << c.name << " must be rejected";
      EXPECT_EQ(absl::StatusCodeToString(plan.status().code()), c.expect_error)
          << plan.status();
      EXPECT_FALSE(plan.status().message().empty());
      continue;
    }
    ASSERT_TRUE(plan.ok()) << plan.status();
    absl::StatusOr<std::vector<float>> expected = LoadExpectedOutput(c);
    ASSERT_TRUE(expected.ok()) << expected.status();
    const CaseInputs in = MakeCaseInputs(c);
    const TypedBuffer q = TypedBuffer::FromFloats(dtype, in.q);
    const TypedBuffer k = TypedBuffer::FromFloats(dtype, in.k);
    const TypedBuffer v = TypedBuffer::FromFloats(dtype, in.v);
    TypedBuffer o(dtype, in.q.size());
    const attention::AttentionTensors tensors{q.cref(), k.cref(), v.cref(), o.ref()};

    o.Poison();
    ASSERT_TRUE(attention::ReferenceAttention(*plan, tensors).ok());
    ErrorReport err = RelativeError(o.ToFloats(), *expected);
    EXPECT_TRUE(err.ok(Tolerance(dtype)))
        << c.name << " reference " << attention::DTypeName(dtype) << ": rel " << err.relative
        << ", non-finite " << err.nan_count;

    for (int threads : {1, 3}) {
      for (auto& backend : AllCpuBackends(threads)) {
        o.Poison();
        ASSERT_TRUE(RunWithWorkspace(*backend, *plan, tensors).ok());
        err = RelativeError(o.ToFloats(), *expected);
        EXPECT_TRUE(err.ok(Tolerance(dtype)))
            << c.name << " " << backend->name() << " x" << threads << " "
            << attention::DTypeName(dtype) << ": rel " << err.relative << ", non-finite "
            << err.nan_count;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(SharedCases, ConformanceTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<ConformanceCase>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace dilattn::testing
