// The fused CUDA kernel against the shared conformance outputs and against the CPU backend on
// random configurations. Skipped (not failed) on machines without a CUDA device.

#include <cuda_runtime_api.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"
#include "tests/common/conformance.h"
#include "tests/common/gpu_test_util.h"
#include "tests/common/random_config.h"
#include "tests/common/run_util.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {
namespace {

using attention::DType;

// Uploads Q, K, V, poisons O with NaN bytes, runs, downloads O into `out`; O placed `o_offset`
// bytes into its allocation (off the 16-byte alignment for some tests).
absl::Status RunOnGpu(attention::AttentionBackend& gpu, const attention::AttentionPlan& plan,
                      const TypedBuffer& q, const TypedBuffer& k, const TypedBuffer& v,
                      TypedBuffer* out, size_t o_offset = 0) {
  return RunOnDevice(gpu, plan, plan.tensor_bytes, q, k, v, out, o_offset);
}

std::unique_ptr<attention::AttentionBackend> Gpu() {
  auto b = attention::CreateCudaBackend({0, nullptr});
  return b.ok() ? *std::move(b) : nullptr;
}

TEST(FusedForward, ConformanceCases) {
  REQUIRE_GPU();
  auto gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  absl::StatusOr<std::vector<ConformanceCase>> cases = LoadConformanceCases();
  ASSERT_TRUE(cases.ok()) << cases.status();
  for (const ConformanceCase& c : *cases) {
    if (!c.expect_error.empty()) continue;
    const std::vector<float> expected = *LoadExpectedOutput(c);
    const CaseInputs in = MakeCaseInputs(c);
    for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
      auto plan = attention::PlanAttention(
          c.options, attention::DenseShape(dtype, c.batch, c.seq_len, c.heads, c.head_dim));
      ASSERT_TRUE(plan.ok());
      const TypedBuffer q = TypedBuffer::FromFloats(dtype, in.q);
      const TypedBuffer k = TypedBuffer::FromFloats(dtype, in.k);
      const TypedBuffer v = TypedBuffer::FromFloats(dtype, in.v);
      TypedBuffer out(dtype, in.q.size());
      ASSERT_TRUE(RunOnGpu(*gpu, *plan, q, k, v, &out).ok()) << c.name;
      const ErrorReport err = RelativeError(out.ToFloats(), expected);
      EXPECT_TRUE(err.ok(Tolerance(dtype)))
          << c.name << " " << attention::DTypeName(dtype) << ": rel " << err.relative
          << " non-finite " << err.nan_count;
    }
  }
}

// One case on both paths with fresh inputs; returns whether the GPU's output matched.
bool CompareCase(attention::AttentionBackend& gpu, attention::AttentionBackend& cpu,
                 SplitMix64& rng, const RandomCase& c, size_t o_offset = 0) {
  SCOPED_TRACE(c.Describe());
  auto plan = attention::PlanAttention(c.options, c.shape);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return false;
  const RandomInputs in = DrawInputs(rng, *plan, c.input_scale);
  TypedBuffer expected(c.shape.dtype, in.q.count());
  expected.Poison();
  const absl::Status cs =
      RunWithWorkspace(cpu, *plan, {in.q.cref(), in.k.cref(), in.v.cref(), expected.ref()});
  EXPECT_TRUE(cs.ok()) << cs;
  TypedBuffer out(c.shape.dtype, in.q.count());
  const absl::Status s = RunOnGpu(gpu, *plan, in.q, in.k, in.v, &out, o_offset);
  EXPECT_TRUE(s.ok()) << s;
  if (!cs.ok() || !s.ok()) return false;
  const ErrorReport err = RelativeError(out.ToFloats(), expected.ToFloats());
  EXPECT_TRUE(err.ok(Tolerance(c.shape.dtype)))
      << "rel " << err.relative << " non-finite " << err.nan_count;
  return err.ok(Tolerance(c.shape.dtype));
}

void CompareRandom(int configs, const RandomCaseLimits& limits) {
  auto gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  auto cpu = attention::CreateCpuBackend({0, "auto"});
  ASSERT_TRUE(cpu.ok());
  const uint64_t seed = TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  int failures = 0;
  for (int i = 0; i < configs && failures < 5; ++i) {
    const RandomCase c = DrawCase(rng, limits);
    SCOPED_TRACE(absl::StrCat("config ", i));
    if (!CompareCase(*gpu, **cpu, rng, c)) ++failures;
  }
}

RandomCaseLimits GpuLimits() {
  RandomCaseLimits l;
  l.max_seq_len = 300;
  l.head_dims = {16, 32, 64, 64, 128, 256};
  l.dtypes = {DType::kFloat16, DType::kBFloat16};
  return l;
}

TEST(FusedForward, RandomConfigurationsMatchTheCpuPath) {
  REQUIRE_GPU();
  CompareRandom(520, GpuLimits());
}

// Long sequences with LongNet-like branches: many tiles, long key walks, both modes.
TEST(FusedForward, LongSequencesMatchTheCpuPath) {
  REQUIRE_GPU();
  RandomCaseLimits l = GpuLimits();
  l.max_seq_len = 4096;
  l.max_heads = 4;
  l.head_dims = {64, 128};
  CompareRandom(12, l);
}

// Fixed cases on both paths, fresh inputs each; O placed `o_offset` bytes into its allocation.
void CompareCases(const std::vector<RandomCase>& cases, size_t o_offset = 0) {
  auto gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  auto cpu = attention::CreateCpuBackend({0, "auto"});
  ASSERT_TRUE(cpu.ok());
  SplitMix64 rng(TestSeed());
  for (const RandomCase& c : cases) CompareCase(*gpu, **cpu, rng, c, o_offset);
}

// Segments and rates far beyond the sequence (the kernel plans spans in 32 bits, clamping them):
// one kept position per segment, a key seen by causal rows at or after it.
TEST(FusedForward, RatesBeyondTheSequence) {
  REQUIRE_GPU();
  std::vector<RandomCase> cases;
  for (attention::Mode mode : {attention::Mode::kLongNet, attention::Mode::kHeadGroups}) {
    for (bool causal : {false, true}) {
      RandomCase& c = cases.emplace_back();
      c.options.mode = mode;
      c.options.causal = causal;
      c.options.segment_lengths = {int64_t{1} << 40, 96, int64_t{1} << 33};
      c.options.dilation_rates = {int64_t{1} << 35, 3, (int64_t{1} << 32) + 7};
      c.shape = attention::DenseShape(DType::kBFloat16, 2, 300, 3, 64);
    }
  }
  CompareCases(cases);
}

// The backend keeps the last tile list staged and re-stages it only when the shape changes:
// repeated shapes, shapes that alternate, and packed batches that differ only in their
// sequence lengths (same token count) must each run on their own tile list.
TEST(FusedForward, RepeatedAndAlternatingShapesMatchTheCpuPath) {
  REQUIRE_GPU();
  auto with_lengths = [](std::vector<int64_t> lengths, int64_t dim, bool causal) {
    RandomCase c;
    c.options.segment_lengths = {64, 128, 256};
    c.options.dilation_rates = {1, 2, 4};
    c.options.causal = causal;
    c.shape.dtype = DType::kBFloat16;
    c.shape.num_heads = 3;
    c.shape.head_dim = dim;
    c.shape.seq_lengths = std::move(lengths);
    return c;
  };
  const RandomCase a = with_lengths({300, 212}, 64, false);
  const RandomCase b = with_lengths({212, 300}, 64, false);   // same tokens, other offsets
  const RandomCase c = with_lengths({300, 212}, 64, true);    // same shape, other options
  const RandomCase d = with_lengths({300, 212}, 128, false);  // the other Hopper kernel
  CompareCases({a, a, b, a, c, a, d, d, a});
}

// An output only 4-byte aligned: the zeros of keyless rows (head_groups) take 4-byte stores.
TEST(FusedForward, OutputOffTheSixteenByteAlignment) {
  REQUIRE_GPU();
  std::vector<RandomCase> cases;
  for (int64_t dim : {32, 64, 128}) {
    RandomCase& c = cases.emplace_back();
    c.options.mode = attention::Mode::kHeadGroups;
    c.options.segment_lengths = {64, 128, 256};
    c.options.dilation_rates = {1, 2, 4};
    c.shape = attention::DenseShape(DType::kFloat16, 2, 520, 6, dim);
  }
  CompareCases(cases, /*o_offset=*/4);
}

// Kept small on purpose: run under compute-sanitizer (memcheck, racecheck) by the device script.
TEST(FusedForward, SanitizerSet) {
  REQUIRE_GPU();
  RandomCaseLimits l = GpuLimits();
  l.max_seq_len = 160;
  CompareRandom(6, l);
}

TEST(FusedForward, RejectsWhatItCannotRun) {
  REQUIRE_GPU();
  auto gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  attention::AttentionOptions o;
  o.segment_lengths = {16};
  o.dilation_rates = {1};
  auto plan = attention::PlanAttention(o, attention::DenseShape(DType::kFloat16, 1, 16, 2, 48));
  ASSERT_TRUE(plan.ok());
  EXPECT_THAT(std::string(gpu->Supports(*plan).message()), ::testing::HasSubstr("D=48"));
  plan = attention::PlanAttention(o, attention::DenseShape(DType::kFloat32, 1, 16, 2, 64));
  EXPECT_EQ(gpu->Supports(*plan).code(), absl::StatusCode::kInvalidArgument);
  plan = attention::PlanAttention(o, attention::DenseShape(DType::kFloat16, 1, 16, 2, 64));
  attention::AttentionPlan wide = *plan;
  wide.params.v_row_stride = int64_t{1} << 31;  // key-row offsets are 32-bit products
  EXPECT_EQ(gpu->Supports(wide).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(gpu->Supports(wide).message()), ::testing::HasSubstr("row strides"));
  {
    DeviceBuffer a(plan->tensor_bytes + 16), b(plan->tensor_bytes), c(plan->tensor_bytes);
    ASSERT_NE(a.ptr, nullptr);
    const DeviceLoc dev = gpu->location();
    void* off = static_cast<unsigned char*>(a.ptr) + 8;  // whole elements, but not 16 bytes
    DeviceBuffer ws(std::max<size_t>(1, gpu->WorkspaceBytes(*plan)));
    const absl::Status m =
        gpu->Run(*plan, {{off, plan->tensor_bytes, dev}, {b.ptr, plan->tensor_bytes, dev},
                         {b.ptr, plan->tensor_bytes, dev}, {c.ptr, plan->tensor_bytes, dev}},
                 {ws.ptr, ws.bytes, dev});
    EXPECT_EQ(m.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(m.message()), ::testing::HasSubstr("16-byte aligned"));
  }
  TypedBuffer host(DType::kFloat16, 16 * 2 * 64);
  const absl::Status s = gpu->Run(*plan, {host.cref(), host.cref(), host.cref(), host.ref()},
                                  {host.data(), host.bytes(), DeviceLoc::Host()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("lives on host"));
}

// Beyond Q, K, V and O the kernel needs only its tile list: well under 1% of the tensors.
TEST(FusedForward, WorkspaceIsUnderOnePercent) {
  attention::AttentionOptions o;
  o.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  o.dilation_rates = {1, 2, 4, 8, 16};
  for (int64_t n : {int64_t{32768}, int64_t{1} << 20}) {
    auto plan = attention::PlanAttention(o, attention::DenseShape(DType::kBFloat16, 1, n, 16, 64));
    ASSERT_TRUE(plan.ok());
    const double tiles = static_cast<double>(attention::CountGpuTiles(*plan, 64));
    const double workspace = tiles * sizeof(attention::GpuTile) + 8.0 * 2;
    EXPECT_LT(workspace, 0.01 * 4 * static_cast<double>(plan->tensor_bytes)) << "N=" << n;
  }
}

}  // namespace
}  // namespace dilattn::testing
