// The fused CUDA kernel against the shared conformance outputs and against the CPU backend on
// random configurations. Skipped (not failed) on machines without a CUDA device.

#include <cuda_runtime_api.h>

#include <cstring>
#include <functional>
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

// One case on both paths with fresh inputs (reshaped by `shape_inputs` where given); returns
// whether the GPU's output matched.
bool CompareCase(attention::AttentionBackend& gpu, attention::AttentionBackend& cpu,
                 SplitMix64& rng, const RandomCase& c, size_t o_offset = 0,
                 const std::function<void(RandomInputs*)>& shape_inputs = nullptr) {
  SCOPED_TRACE(c.Describe());
  auto plan = attention::PlanAttention(c.options, c.shape);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return false;
  RandomInputs in = DrawInputs(rng, *plan, c.input_scale);
  if (shape_inputs) shape_inputs(&in);
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
void CompareCases(const std::vector<RandomCase>& cases, size_t o_offset = 0,
                  const std::function<void(RandomInputs*)>& shape_inputs = nullptr) {
  auto gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  auto cpu = attention::CreateCpuBackend({0, "auto"});
  ASSERT_TRUE(cpu.ok());
  SplitMix64 rng(TestSeed());
  for (const RandomCase& c : cases) CompareCase(*gpu, **cpu, rng, c, o_offset, shape_inputs);
}

// Keys whose scores rise far above every earlier key's along each walk: the second half of every
// 256 tokens has its keys scaled by 200, so that key tiles there fail the softmax against the
// stale max, most with exponents far past fp32's range (infinite probabilities), and each failing
// warp recomputes its own scores (WarpScores) while the other warps of its warpgroup go on.
TEST(FusedForward, ScoresRisingFarAboveEarlierKeys) {
  REQUIRE_GPU();
  std::vector<RandomCase> cases;
  for (int64_t dim : {64, 128}) {
    for (attention::Mode mode : {attention::Mode::kLongNet, attention::Mode::kHeadGroups}) {
      for (bool causal : {false, true}) {
        for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
          RandomCase& c = cases.emplace_back();
          c.options.mode = mode;
          c.options.causal = causal;
          c.options.segment_lengths = {256, 512, 1024};
          c.options.dilation_rates = {1, 2, 4};
          c.shape = attention::DenseShape(dtype, 1, 1024, 3, dim);
        }
      }
    }
  }
  CompareCases(cases, 0, [](RandomInputs* in) {
    const size_t row = in->k.count() / 1024;  // one token's H * D elements
    for (size_t i = 0; i < in->k.count(); ++i) {
      if ((i / row) % 256 >= 128) in->k.Set(i, in->k.Get(i) * 200.f);
    }
  });
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

// A plan run in parts over its rows (PrepareParts, RunPart) as the server's executor runs a long
// job that cannot be cut into independent problems: before part i only Q's rows below its q_end
// are on the device (the rest NaN bytes), K and V whole. After part i, the output rows below the
// next cut must equal one launch's bit for bit, and after the last part every row must.
TEST(FusedForward, RowPartsMatchOneLaunch) {
  REQUIRE_GPU();
  auto gpu = Gpu();
  ASSERT_NE(gpu, nullptr);
  SplitMix64 rng(TestSeed());
  struct PartsCase {
    attention::AttentionOptions options;
    attention::ProblemShape shape;
    std::vector<int> eighths;  // cuts at these eighths of the rows (0 and 8 added)
  };
  auto options = [](attention::Mode mode, std::vector<int64_t> w, std::vector<int64_t> r,
                    bool causal) {
    attention::AttentionOptions o;
    o.mode = mode;
    o.segment_lengths = std::move(w);
    o.dilation_rates = std::move(r);
    o.causal = causal;
    return o;
  };
  auto packed = [](DType dtype, std::vector<int64_t> lengths, int64_t heads, int64_t dim) {
    attention::ProblemShape s;
    s.dtype = dtype;
    s.num_heads = heads;
    s.head_dim = dim;
    s.seq_lengths = std::move(lengths);
    return s;
  };
  const std::vector<PartsCase> cases = {
      // A segment as long as the sequence, so nothing cuts it into independent problems.
      {options(attention::Mode::kLongNet, {128, 4096}, {1, 16}, false),
       attention::DenseShape(DType::kBFloat16, 1, 4096, 2, 64),
       {1, 2, 3, 4, 5, 6, 7}},
      {options(attention::Mode::kLongNet, {128, 4096}, {1, 16}, true),
       attention::DenseShape(DType::kFloat16, 1, 4096, 2, 64),
       {2, 4, 6}},
      // Keyless tiles (head groups), sequences of several lengths, cuts inside them, empty parts.
      {options(attention::Mode::kHeadGroups, {100, 300, 2000}, {1, 2, 4}, true),
       packed(DType::kBFloat16, {1500, 37, 2200}, 6, 64),
       {1, 1, 3, 7, 7}},
      // The mma.sync kernel (D = 32) and the D = 128 one.
      {options(attention::Mode::kLongNet, {64, 512, 3000}, {1, 4, 8}, false),
       packed(DType::kFloat16, {3000, 900}, 4, 32),
       {3, 5}},
      {options(attention::Mode::kLongNet, {256, 2048}, {2, 8}, true),
       attention::DenseShape(DType::kBFloat16, 2, 2048, 2, 128),
       {1, 4, 6}},
  };
  for (const PartsCase& c : cases) {
    auto plan = attention::PlanAttention(c.options, c.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    SCOPED_TRACE(attention::DescribeShape(c.shape));
    const int64_t total = plan->params.total_tokens;
    const size_t bytes = plan->tensor_bytes;
    const size_t row_bytes = bytes / static_cast<size_t>(total);
    std::vector<int64_t> cuts = {0};
    for (int e : c.eighths) cuts.push_back(total * e / 8);
    cuts.push_back(total);
    RandomInputs in = DrawInputs(rng, *plan, 1.0f);
    TypedBuffer whole(c.shape.dtype, in.q.count());
    ASSERT_TRUE(RunOnGpu(*gpu, *plan, in.q, in.k, in.v, &whole).ok());

    absl::StatusOr<std::vector<int64_t>> q_ends = gpu->PrepareParts(*plan, cuts);
    ASSERT_TRUE(q_ends.ok()) << q_ends.status();
    ASSERT_EQ(q_ends->size(), cuts.size() - 1);
    DeviceBuffer dq(bytes), dk(bytes), dv(bytes), dout(bytes), ws(gpu->WorkspaceBytes(*plan));
    ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dout.ptr && ws.ptr);
    ASSERT_EQ(cudaMemcpy(dk.ptr, in.k.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dv.ptr, in.v.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemset(dq.ptr, 0xff, bytes), cudaSuccess);
    ASSERT_EQ(cudaMemset(dout.ptr, 0xff, bytes), cudaSuccess);
    const DeviceLoc dev = gpu->location();
    const attention::AttentionTensors tensors{
        {dq.ptr, bytes, dev}, {dk.ptr, bytes, dev}, {dv.ptr, bytes, dev}, {dout.ptr, bytes, dev}};
    std::vector<unsigned char> out(bytes);
    const auto* expected = static_cast<const unsigned char*>(whole.data());
    int64_t q_in = 0;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      SCOPED_TRACE(absl::StrCat("part ", i, " of rows [", cuts[i], ", ", cuts[i + 1], ")"));
      const int64_t q_end = (*q_ends)[i];
      ASSERT_GE(q_end, q_in);
      ASSERT_GE(q_end, cuts[i + 1]);
      ASSERT_LE(q_end, total);
      ASSERT_EQ(cudaMemcpy(static_cast<unsigned char*>(dq.ptr) + q_in * row_bytes,
                           static_cast<const unsigned char*>(in.q.data()) + q_in * row_bytes,
                           (q_end - q_in) * row_bytes, cudaMemcpyHostToDevice),
                cudaSuccess);
      q_in = q_end;
      ASSERT_TRUE(gpu->RunPart(*plan, tensors, {ws.ptr, ws.bytes, dev}, i).ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(out.data(), dout.ptr, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
      const size_t final_bytes = static_cast<size_t>(cuts[i + 1]) * row_bytes;
      EXPECT_EQ(std::memcmp(out.data(), expected, final_bytes), 0);
    }
    EXPECT_EQ(q_in, total);
  }
  // Cuts that do not ascend from 0 to the rows are refused, and so is a part never prepared.
  auto plan = attention::PlanAttention(options(attention::Mode::kLongNet, {64}, {1}, false),
                                       attention::DenseShape(DType::kFloat16, 1, 256, 1, 64));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(gpu->PrepareParts(*plan, {0, 300}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu->PrepareParts(*plan, {0, 200, 100, 256}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu->RunPart(*plan, {}, {}, 0).code(), absl::StatusCode::kFailedPrecondition);
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
