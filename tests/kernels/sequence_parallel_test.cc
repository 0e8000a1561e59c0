// Sequence parallelism on the GPUs of this machine against the single-GPU kernel: the same
// output to the kernel's rounding (each GPU runs the same tiles on the same keys; tiles cut at
// a slice bound may round differently in their stale-max decisions). Skipped (not failed)
// without two GPUs; with one GPU the runner must give the single-GPU output bit for bit.

#include "kernels/attention/sequence_parallel.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cuda/sequence_parallel_runner.h"
#include "kernels/attention/padded_plan.h"
#include "kernels/memory/allocator.h"
#include "tests/common/gpu_test_util.h"
#include "tests/common/random_config.h"
#include "tests/common/run_util.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {
namespace {

using attention::DType;

RandomCase Case(DType dtype, int64_t n, int64_t heads, int64_t dim, attention::Mode mode,
                bool causal, std::vector<int64_t> w, std::vector<int64_t> r) {
  RandomCase c;
  c.options.mode = mode;
  c.options.causal = causal;
  c.options.segment_lengths = std::move(w);
  c.options.dilation_rates = std::move(r);
  c.shape = attention::DenseShape(dtype, 1, n, heads, dim);
  return c;
}

// Runs `c` on the runner and on one GPU with fresh inputs and checks that both agree (bit for bit
// when `exact`).
void Compare(attention::cuda::SequenceParallelRunner& runner, const RandomCase& c, bool exact,
             SplitMix64& rng) {
  SCOPED_TRACE(c.Describe());
  auto plan = attention::PlanAttention(c.options, c.shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const RandomInputs in = DrawInputs(rng, *plan, c.input_scale);
  auto single = attention::CreateCudaBackend({0, nullptr});
  ASSERT_TRUE(single.ok());
  TypedBuffer expected(c.shape.dtype, in.q.count());
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);  // the single-GPU backend's device
  const absl::Status one =
      RunOnDevice(**single, *plan, plan->tensor_bytes, in.q, in.k, in.v, &expected);
  ASSERT_TRUE(one.ok()) << one;
  TypedBuffer out(c.shape.dtype, in.q.count());
  out.Poison();
  const absl::Status s = runner.Run(*plan, {in.q.cref(), in.k.cref(), in.v.cref(), out.ref()});
  ASSERT_TRUE(s.ok()) << s;
  const std::vector<float> got = out.ToFloats(), want = expected.ToFloats();
  if (exact) {
    ASSERT_EQ(std::memcmp(const_cast<TypedBuffer&>(out).data(), expected.data(),
                          plan->tensor_bytes),
              0)
        << "not bit for bit";
  }
  const ErrorReport err = RelativeError(got, want);
  EXPECT_TRUE(err.ok(1e-3)) << "rel " << err.relative << " non-finite " << err.nan_count;
}

std::vector<RandomCase> Cases() {
  using attention::Mode;
  return {
      // Local branches and one whose segment is the whole sequence (exchanged).
      Case(DType::kBFloat16, 12000, 4, 64, Mode::kLongNet, false, {2048, 4096, 12000},
           {1, 2, 8}),
      Case(DType::kBFloat16, 12000, 4, 64, Mode::kLongNet, true, {2048, 4096, 12000}, {1, 2, 8}),
      Case(DType::kFloat16, 9000, 6, 128, Mode::kHeadGroups, true, {1000, 9000, 4500}, {1, 4, 2}),
      Case(DType::kFloat16, 9000, 6, 128, Mode::kHeadGroups, false, {1000, 9000, 4500},
           {1, 4, 2}),
      // No branch fits a slice: cells span the slice bound and tiles are cut there.
      Case(DType::kBFloat16, 16000, 2, 64, Mode::kLongNet, true, {30000, 20000}, {3, 5}),
      // mma.sync head dims; a short last slice.
      Case(DType::kFloat16, 5001, 3, 32, Mode::kLongNet, false, {512, 5001}, {1, 16}),
      Case(DType::kBFloat16, 4099, 2, 256, Mode::kHeadGroups, true, {256, 4099}, {1, 4}),
  };
}

absl::StatusOr<std::unique_ptr<attention::cuda::SequenceParallelRunner>> EveryGpu() {
  std::vector<int> devices;
  for (int d = 0; d < memory::CudaDeviceCount(); ++d) devices.push_back(d);
  return attention::cuda::SequenceParallelRunner::Create(devices);
}

TEST(SequenceParallel, MatchesOneGpuAcrossEveryGpu) {
  if (memory::CudaDeviceCount() < 2) GTEST_SKIP() << "needs two or more CUDA devices";
  auto runner = EveryGpu();
  ASSERT_TRUE(runner.ok()) << runner.status();
  SplitMix64 rng(TestSeed());
  for (const RandomCase& c : Cases()) Compare(**runner, c, false, rng);
  RandomCaseLimits limits;
  limits.max_seq_len = 8000;
  limits.max_heads = 4;
  limits.head_dims = {32, 64, 128};
  limits.dtypes = {DType::kFloat16, DType::kBFloat16};
  for (int i = 0; i < 12; ++i) {
    RandomCase c = DrawCase(rng, limits);
    c.shape.seq_lengths.resize(1);
    Compare(**runner, c, false, rng);
  }
}

// Where every segment fits a slice, a GPU holds Q, K, V and O over its slice only (and its tile
// table): memory per GPU falls with the number of GPUs.
TEST(SequenceParallel, EachGpuHoldsOnlyItsSliceWhereNoSegmentSpans) {
  if (memory::CudaDeviceCount() < 2) GTEST_SKIP() << "needs two or more CUDA devices";
  auto runner = EveryGpu();
  ASSERT_TRUE(runner.ok()) << runner.status();
  SplitMix64 rng(TestSeed());
  for (bool causal : {false, true}) {
    const RandomCase c = Case(DType::kBFloat16, 32768, 4, 64, attention::Mode::kLongNet, causal,
                              {2048, 4096}, {1, 2});
    Compare(**runner, c, false, rng);
    auto plan = attention::PlanAttention(c.options, c.shape);
    ASSERT_TRUE(plan.ok());
    auto sp = attention::PlanSequenceParallel(*plan, (*runner)->num_devices(), 128);
    ASSERT_TRUE(sp.ok());
    ASSERT_TRUE(sp->spanning_branches.empty());
    const std::vector<size_t> held = (*runner)->LastRunDeviceBytes();
    ASSERT_EQ(held.size(), static_cast<size_t>((*runner)->num_devices()));
    const size_t row_bytes = 4 * 64 * 2;
    for (size_t g = 0; g < sp->slices.size(); ++g) {
      const auto& s = sp->slices[g];
      const size_t tensors = 4 * static_cast<size_t>(s.end - s.begin) * row_bytes;
      const size_t tables = 256 + s.tiles.size() * sizeof(attention::GpuTile);
      EXPECT_GE(held[g], tensors) << "GPU " << g;
      EXPECT_LE(held[g], tensors + tables) << "GPU " << g << " holds more than its slice";
    }
  }
}

// SequenceParallelLeases is what the server asks before sending a request to the split: it must
// be what a run leases, its tile table estimate an upper bound.
TEST(SequenceParallel, PlannedLeasesAreWhatARunLeases) {
  if (memory::CudaDeviceCount() < 2) GTEST_SKIP() << "needs two or more CUDA devices";
  auto runner = EveryGpu();
  ASSERT_TRUE(runner.ok()) << runner.status();
  SplitMix64 rng(TestSeed());
  const int ranks = (*runner)->num_devices();
  for (const RandomCase& c : Cases()) {
    Compare(**runner, c, false, rng);
    auto plan = attention::PlanAttention(c.options, c.shape);
    ASSERT_TRUE(plan.ok());
    auto sp = attention::PlanSequenceParallel(*plan, ranks, 128);
    ASSERT_TRUE(sp.ok());
    const std::vector<std::vector<size_t>> leases =
        attention::SequenceParallelLeases(*sp, *plan, ranks);
    const std::vector<size_t> held = (*runner)->LastRunDeviceBytes();
    ASSERT_EQ(leases.size(), held.size());
    for (size_t g = 0; g < held.size(); ++g) {
      size_t planned = 0;
      for (size_t b : leases[g]) planned += b;
      const size_t table = leases[g].back();  // the estimate: at most this much
      EXPECT_LE(held[g], planned) << "GPU " << g;
      EXPECT_GE(held[g] + table, planned) << "GPU " << g;
    }
  }
}

TEST(SequenceParallel, OneGpuIsTheSingleGpuKernelBitForBit) {
  REQUIRE_GPU();
  auto runner = attention::cuda::SequenceParallelRunner::Create({0});
  ASSERT_TRUE(runner.ok()) << runner.status();
  SplitMix64 rng(TestSeed());
  for (const RandomCase& c : Cases()) Compare(**runner, c, true, rng);
}

// The runner keeps the host plan of the last shape: a repeated shape reuses it, another shape
// replaces it, and each run is right for its own inputs and shape.
TEST(SequenceParallel, ShapesInTurnEachGetTheirOwnPlan) {
  REQUIRE_GPU();
  auto runner = EveryGpu();
  ASSERT_TRUE(runner.ok()) << runner.status();
  const bool one_gpu = (*runner)->num_devices() == 1;
  SplitMix64 rng(TestSeed());
  const std::vector<RandomCase> cases = Cases();
  for (int i : {0, 0, 1, 0, 2, 2, 1})
    Compare(**runner, cases[static_cast<size_t>(i)], one_gpu, rng);
}

// Slices of 262144 rows or more run in four launches, each part's output going back while the
// next runs; tiles belong to the part of their first row. Same answer as one launch (bit for bit
// on one GPU).
TEST(SequenceParallel, LongSlicesRunInPartsWithTheSameAnswer) {
  REQUIRE_GPU();
  auto runner = EveryGpu();
  ASSERT_TRUE(runner.ok()) << runner.status();
  const bool one_gpu = (*runner)->num_devices() == 1;
  const int64_t n = 2 * 4 * 65536 + 1000;
  SplitMix64 rng(TestSeed());
  for (bool causal : {false, true}) {
    Compare(**runner,
            Case(DType::kBFloat16, n, 2, 64, attention::Mode::kLongNet, causal, {2048, 8192, n},
                 {1, 4, 256}),
            one_gpu, rng);
  }
  Compare(**runner,
          Case(DType::kFloat16, n, 3, 64, attention::Mode::kHeadGroups, false, {4096, 2048, n},
               {2, 1, 512}),
          one_gpu, rng);
  // Without a branch as long as the sequence nothing is exchanged, and the parts are cut at
  // multiples of every segment length: each part's launch waits only for its own inputs.
  Compare(**runner,
          Case(DType::kBFloat16, n, 2, 64, attention::Mode::kLongNet, false, {2048, 8192}, {1, 4}),
          one_gpu, rng);
  Compare(**runner,
          Case(DType::kFloat16, n, 3, 64, attention::Mode::kHeadGroups, true, {4096, 2048, 1024},
               {2, 1, 4}),
          one_gpu, rng);
}

// The server's --device-pool-mib caps each GPU's sequence-parallel pool as it caps the
// executors' pools; a run that needs more than the cap fails cleanly instead of taking it.
TEST(SequenceParallel, PoolBytesCapEachGpusPool) {
  REQUIRE_GPU();
  constexpr size_t kCap = size_t{1} << 20;
  auto runner = attention::cuda::SequenceParallelRunner::Create({0}, kCap);
  ASSERT_TRUE(runner.ok()) << runner.status();
  for (const memory::BufferPool* pool : (*runner)->pools()) EXPECT_EQ(pool->byte_cap(), kCap);
  SplitMix64 rng(TestSeed());
  const RandomCase c =
      Case(DType::kBFloat16, 65536, 2, 64, attention::Mode::kLongNet, false, {2048, 8192}, {1, 4});
  auto plan = attention::PlanAttention(c.options, c.shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const RandomInputs in = DrawInputs(rng, *plan, c.input_scale);  // 16 MiB a tensor
  TypedBuffer out(c.shape.dtype, in.q.count());
  const absl::Status s = (*runner)->Run(*plan, {in.q.cref(), in.k.cref(), in.v.cref(), out.ref()});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  auto uncapped = attention::cuda::SequenceParallelRunner::Create({0});
  ASSERT_TRUE(uncapped.ok()) << uncapped.status();
  for (const memory::BufferPool* pool : (*uncapped)->pools()) EXPECT_GT(pool->byte_cap(), kCap);
}

// Head dims without a kernel run padded (padded_plan.h): the runner takes the padded plan and the
// request's own rows, and answers as the CPU path does at the real head dim. On every GPU there
// is (one GPU: no split, the same copies).
TEST(SequenceParallel, PaddedHeadDimsMatchTheCpuPath) {
  REQUIRE_GPU();
  auto runner = EveryGpu();
  ASSERT_TRUE(runner.ok()) << runner.status();
  auto single = attention::CreateCudaBackend({0, nullptr});
  auto cpu = attention::CreateCpuBackend({0, "auto"});
  ASSERT_TRUE(single.ok() && cpu.ok());
  SplitMix64 rng(TestSeed());
  for (const RandomCase& c : {Case(DType::kBFloat16, 12000, 3, 96, attention::Mode::kLongNet, true,
                                   {2048, 4096, 12000}, {1, 2, 8}),
                              Case(DType::kFloat16, 9000, 2, 40, attention::Mode::kHeadGroups,
                                   false, {1000, 9000}, {1, 4})}) {
    SCOPED_TRACE(c.Describe());
    auto plan = attention::PlanAttention(c.options, c.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    auto padded = attention::PaddedAttentionPlan(*plan, **single);
    ASSERT_TRUE(padded.ok()) << padded.status();
    EXPECT_GT(padded->shape.head_dim, c.shape.head_dim);
    const RandomInputs in = DrawInputs(rng, *plan, c.input_scale);
    TypedBuffer expected(c.shape.dtype, in.q.count()), out(c.shape.dtype, in.q.count());
    ASSERT_TRUE(
        RunWithWorkspace(**cpu, *plan, {in.q.cref(), in.k.cref(), in.v.cref(), expected.ref()})
            .ok());
    out.Poison();
    const absl::Status s = (*runner)->Run(
        *padded, {in.q.cref(), in.k.cref(), in.v.cref(), out.ref()}, c.shape.head_dim);
    ASSERT_TRUE(s.ok()) << s;
    const ErrorReport err = RelativeError(out.ToFloats(), expected.ToFloats());
    EXPECT_TRUE(err.ok(Tolerance(c.shape.dtype)))
        << "rel " << err.relative << " non-finite " << err.nan_count;
  }
  // Rows of another head dim than the call names are refused by size.
  auto plan = attention::PlanAttention(
      Case(DType::kBFloat16, 4096, 2, 96, attention::Mode::kLongNet, false, {2048}, {1}).options,
      attention::DenseShape(DType::kBFloat16, 1, 4096, 2, 96));
  ASSERT_TRUE(plan.ok());
  auto padded = attention::PaddedAttentionPlan(*plan, **single);
  ASSERT_TRUE(padded.ok());
  TypedBuffer t(DType::kBFloat16, 4096 * 2 * 96), o(DType::kBFloat16, 4096 * 2 * 96);
  EXPECT_EQ((*runner)->Run(*padded, {t.cref(), t.cref(), t.cref(), o.ref()}, 80).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SequenceParallel, RefusesWhatItCannotRun) {
  REQUIRE_GPU();
  auto runner = attention::cuda::SequenceParallelRunner::Create({0});
  ASSERT_TRUE(runner.ok()) << runner.status();
  attention::AttentionOptions o;
  o.segment_lengths = {16};
  o.dilation_rates = {1};
  auto plan = attention::PlanAttention(o, attention::DenseShape(DType::kBFloat16, 2, 32, 2, 64));
  ASSERT_TRUE(plan.ok());
  TypedBuffer t(DType::kBFloat16, 2 * 32 * 2 * 64), out(DType::kBFloat16, 2 * 32 * 2 * 64);
  const absl::Status s = (*runner)->Run(*plan, {t.cref(), t.cref(), t.cref(), out.ref()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("one sequence"), std::string::npos) << s;
  EXPECT_FALSE(attention::cuda::SequenceParallelRunner::Create({0, 0}).ok());
}

}  // namespace
}  // namespace dilattn::testing
