// Block-sparse attention on the fused CUDA kernels against the CPU block-sparse backend (itself
// checked against a naive implementation and the float64 reference in tests/unit), on both
// kernel variants this card runs: the one the selector picks and mma.sync
// (DILATTN_CUDA_KERNEL=mma). Skipped (not failed) on machines without a CUDA device.

#include "kernels/block_sparse/block_sparse.h"

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/block_sparse/gpu_work.h"
#include "tests/common/gpu_test_util.h"
#include "tests/common/random_config.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {
namespace {

using attention::DType;
using block_sparse::BlockSparseBackend;
using block_sparse::BlockSparseOptions;
using block_sparse::BlockSparsePlan;
using block_sparse::Pattern;

// The selector's variant, then mma.sync everywhere.
std::vector<std::unique_ptr<BlockSparseBackend>> GpuVariants() {
  std::vector<std::unique_ptr<BlockSparseBackend>> out;
  for (bool mma : {false, true}) {
    if (mma) setenv("DILATTN_CUDA_KERNEL", "mma", 1);
    auto b = block_sparse::CreateCudaBlockSparseBackend({0, nullptr});
    if (mma) unsetenv("DILATTN_CUDA_KERNEL");
    if (b.ok()) out.push_back(*std::move(b));
  }
  return out;
}

struct SparseCase {
  BlockSparseOptions options;
  attention::ProblemShape shape;
  std::string Describe() const {
    return absl::StrCat(block_sparse::PatternName(options.pattern), " bs=", options.block_size,
                        options.causal ? " causal " : " ", attention::DescribeShape(shape));
  }
};

SparseCase DrawCase(SplitMix64& rng, int64_t max_len) {
  SparseCase c;
  BlockSparseOptions& o = c.options;
  static const int64_t kSizes[] = {16, 48, 64, 100, 128, 130, 200, 256};
  o.block_size = rng.Uniform(0, 3) == 0 ? rng.Uniform(1, 300) : kSizes[rng.Uniform(0, 7)];
  DrawBlockSparsePattern(rng, &o);
  c.shape.dtype = rng.Uniform(0, 1) == 0 ? DType::kFloat16 : DType::kBFloat16;
  c.shape.num_heads = rng.Uniform(1, 4);
  static const int64_t kDims[] = {16, 32, 64, 64, 128, 128, 256};
  c.shape.head_dim = kDims[rng.Uniform(0, 6)];
  // Explicit pairs name blocks 0..2, so sequences hold at least 3 blocks.
  const int64_t min_len = o.pattern == Pattern::kExplicit ? 3 * o.block_size : 1;
  for (int64_t s = rng.Uniform(1, 3); s > 0; --s) {
    c.shape.seq_lengths.push_back(rng.Uniform(min_len, std::max(min_len, max_len)));
  }
  return c;
}

// One case on the GPU variants and the CPU path with fresh inputs; false on any mismatch.
bool CompareCase(const std::vector<std::unique_ptr<BlockSparseBackend>>& gpus,
                 BlockSparseBackend& cpu, SplitMix64& rng, const SparseCase& c) {
  SCOPED_TRACE(c.Describe());
  absl::StatusOr<BlockSparsePlan> plan = block_sparse::PlanBlockSparse(c.options, c.shape);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return false;
  const size_t n = plan->tensor_bytes / attention::DTypeSize(c.shape.dtype);
  TypedBuffer q(c.shape.dtype, n), k(c.shape.dtype, n), v(c.shape.dtype, n);
  // Scores of a few units: softmax neither flat nor one-hot.
  for (TypedBuffer* t : {&q, &k, &v}) {
    for (size_t i = 0; i < n; ++i) t->Set(i, rng.NextFloat(t == &v ? 1.0f : 0.6f));
  }
  TypedBuffer expected(c.shape.dtype, n);
  expected.Poison();
  std::vector<unsigned char> ws(cpu.WorkspaceBytes(*plan) + 64);
  void* aligned = ws.data() + (64 - reinterpret_cast<uintptr_t>(ws.data()) % 64) % 64;
  const absl::Status cs = cpu.Run(*plan, {q.cref(), k.cref(), v.cref(), expected.ref()},
                                  {aligned, ws.size() - 64, DeviceLoc::Host()});
  EXPECT_TRUE(cs.ok()) << cs;
  if (!cs.ok()) return false;
  bool all = true;
  for (const auto& gpu : gpus) {
    SCOPED_TRACE(gpu->name());
    TypedBuffer out(c.shape.dtype, n);
    const absl::Status s = RunOnDevice(*gpu, *plan, plan->tensor_bytes, q, k, v, &out);
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) return false;
    const ErrorReport err = RelativeError(out.ToFloats(), expected.ToFloats());
    EXPECT_TRUE(err.ok(Tolerance(c.shape.dtype)))
        << "rel " << err.relative << " non-finite " << err.nan_count;
    all = all && err.ok(Tolerance(c.shape.dtype));
  }
  return all;
}

// Both GPU variants and the CPU path, created once per test; every test skips without a device.
class BlockSparseGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveDevice()) GTEST_SKIP() << "no CUDA device here";
    gpus_ = GpuVariants();
    ASSERT_EQ(gpus_.size(), 2u);
    auto cpu = block_sparse::CreateCpuBlockSparseBackend({0, "auto"});
    ASSERT_TRUE(cpu.ok());
    cpu_ = *std::move(cpu);
  }

  bool Compare(const SparseCase& c) { return CompareCase(gpus_, *cpu_, rng_, c); }

  void CompareRandom(int configs, int64_t max_len, int64_t max_heads = 4) {
    SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed_));
    int failures = 0;
    for (int i = 0; i < configs && failures < 5; ++i) {
      SparseCase c = DrawCase(rng_, max_len);
      c.shape.num_heads = std::min(c.shape.num_heads, max_heads);
      SCOPED_TRACE(absl::StrCat("config ", i));
      if (!Compare(c)) ++failures;
    }
  }

  std::vector<std::unique_ptr<BlockSparseBackend>> gpus_;
  std::unique_ptr<BlockSparseBackend> cpu_;
  const uint64_t seed_ = TestSeed();
  SplitMix64 rng_{seed_};
};

TEST_F(BlockSparseGpu, RandomConfigurationsMatchTheCpuPath) {
  CompareRandom(300, 700);
}

// Long sequences: many tiles, walks of many runs, the causal split of the last run.
TEST_F(BlockSparseGpu, LongSequencesMatchTheCpuPath) {
  for (Pattern pattern :
       {Pattern::kLocalWindow, Pattern::kGlobalLocal, Pattern::kStrided, Pattern::kRandom}) {
    for (bool causal : {false, true}) {
      SparseCase c;
      c.options.block_size = pattern == Pattern::kStrided ? 64 : 128;
      c.options.pattern = pattern;
      c.options.window = 2;
      c.options.global_blocks = 2;
      c.options.stride = 3;
      c.options.density = 0.3;
      c.options.seed = 7;
      c.options.causal = causal;
      c.shape = attention::DenseShape(causal ? DType::kBFloat16 : DType::kFloat16, 1, 6000, 2,
                                      pattern == Pattern::kRandom ? 128 : 64);
      Compare(c);
    }
  }
}

// Query blocks with no key (explicit pairs that leave some out) write zeros, not NaN.
TEST_F(BlockSparseGpu, BlocksWithoutKeysWriteZeros) {
  for (bool causal : {false, true}) {
    SparseCase c;
    c.options.block_size = 64;
    c.options.pattern = Pattern::kExplicit;
    c.options.pairs = {{1, 0}, {3, 3}, {3, 1}};  // blocks 0 and 2 keep nothing
    c.options.causal = causal;
    c.shape = attention::DenseShape(DType::kBFloat16, 2, 256, 3, 64);
    Compare(c);
  }
}

// The backend keeps the last tables staged and plans again only when the problem changes:
// repeated problems, alternating ones, and ones that differ only in the pattern's parameters,
// the causal flag or the sequence lengths must each run on their own tables.
TEST_F(BlockSparseGpu, RepeatedAndAlternatingProblemsMatchTheCpuPath) {
  auto with = [](double density, bool causal, std::vector<int64_t> lengths) {
    SparseCase c;
    c.options.block_size = 64;
    c.options.pattern = Pattern::kRandom;
    c.options.density = density;
    c.options.seed = 3;
    c.options.causal = causal;
    c.shape.dtype = DType::kBFloat16;
    c.shape.num_heads = 2;
    c.shape.head_dim = 64;
    c.shape.seq_lengths = std::move(lengths);
    return c;
  };
  const SparseCase a = with(0.4, false, {700, 300});
  const SparseCase b = with(0.4000001, false, {700, 300});  // equal to 6 digits
  const SparseCase c = with(0.4, true, {700, 300});
  const SparseCase d = with(0.4, false, {300, 700});
  for (const SparseCase* x : {&a, &a, &b, &a, &c, &a, &d, &a}) Compare(*x);
}

// Kept small on purpose: run under compute-sanitizer (memcheck, racecheck, synccheck).
TEST_F(BlockSparseGpu, SanitizerSet) {
  CompareRandom(6, 300, 2);
}

// Both CUDA backends name the device by major and minor compute capability ("sm90" on Hopper),
// as the README's backend table and the server's log say.
TEST_F(BlockSparseGpu, NamesTheDeviceByMajorAndMinorCapability) {
  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  const std::string sm = absl::StrCat("sm", prop.major, prop.minor);
  for (const auto& gpu : gpus_) {
    EXPECT_EQ(gpu->name(), absl::StrCat("cuda-block-sparse-", sm));
  }
  auto dilated = attention::CreateCudaBackend({0, nullptr});
  ASSERT_TRUE(dilated.ok()) << dilated.status();
  EXPECT_EQ((*dilated)->name(), absl::StrCat("cuda-", sm));
}

TEST_F(BlockSparseGpu, RejectsWhatItCannotRun) {
  BlockSparseBackend& gpu = *gpus_.front();
  BlockSparseOptions o;
  o.block_size = 16;
  auto plan =
      block_sparse::PlanBlockSparse(o, attention::DenseShape(DType::kFloat16, 1, 64, 2, 48));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(gpu.Supports(*plan).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(gpu.Supports(*plan).message()), ::testing::HasSubstr("D=48"));
  plan = block_sparse::PlanBlockSparse(o, attention::DenseShape(DType::kFloat32, 1, 64, 2, 64));
  ASSERT_TRUE(plan.ok());
  EXPECT_THAT(std::string(gpu.Supports(*plan).message()), ::testing::HasSubstr("fp16 or bf16"));
  plan = block_sparse::PlanBlockSparse(o, attention::DenseShape(DType::kFloat16, 1, 64, 2, 64));
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(gpu.Supports(*plan).ok());
  TypedBuffer host(DType::kFloat16, 64 * 2 * 64);
  const absl::Status s = gpu.Run(*plan, {host.cref(), host.cref(), host.cref(), host.ref()},
                                 {host.data(), host.bytes(), DeviceLoc::Host()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("lives on host"));
  {
    DeviceBuffer a(plan->tensor_bytes + 16), b(plan->tensor_bytes), c(plan->tensor_bytes);
    DeviceBuffer ws(gpu.WorkspaceBytes(*plan));
    ASSERT_NE(a.ptr, nullptr);
    const DeviceLoc dev = gpu.location();
    void* off = static_cast<unsigned char*>(a.ptr) + 8;
    const absl::Status m = gpu.Run(*plan,
                                   {{off, plan->tensor_bytes, dev},
                                    {b.ptr, plan->tensor_bytes, dev},
                                    {b.ptr, plan->tensor_bytes, dev},
                                    {c.ptr, plan->tensor_bytes, dev}},
                                   {ws.ptr, ws.bytes, dev});
    EXPECT_EQ(m.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(m.message()), ::testing::HasSubstr("16-byte aligned"));
    const absl::Status small = gpu.Run(*plan,
                                       {{b.ptr, plan->tensor_bytes, dev},
                                        {b.ptr, plan->tensor_bytes, dev},
                                        {b.ptr, plan->tensor_bytes, dev},
                                        {c.ptr, plan->tensor_bytes, dev}},
                                       {ws.ptr, 8, dev});
    EXPECT_THAT(std::string(small.message()), ::testing::HasSubstr("workspace"));
  }
}

}  // namespace
}  // namespace dilattn::testing
