// The GPU multihead path (cuBLASLt projections around the fused attention kernel) against the
// float64 reference on random problems. Skipped without a device.

#include "kernels/multihead/multihead.h"

#include <cuda_runtime_api.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/common/gpu_test_util.h"
#include "tests/common/multihead_util.h"
#include "tests/common/random_config.h"

namespace dilattn::multihead {
namespace {

using ::dilattn::testing::DeviceBuffer;
using ::dilattn::testing::SplitMix64;
using ::dilattn::testing::TypedBuffer;

// Uploads X, poisons Y (all-ones bytes: NaN in fp16 and bf16), runs, downloads Y.
absl::Status RunOnGpu(MultiheadBackend& gpu, const MultiheadPlan& plan, const TypedBuffer& x,
                      TypedBuffer* y) {
  const size_t bytes = plan.tensor_bytes;
  DeviceBuffer dx(bytes), dy(bytes), ws(gpu.WorkspaceBytes(plan));
  if (dx.ptr == nullptr || dy.ptr == nullptr || ws.ptr == nullptr) {
    return absl::ResourceExhaustedError("cudaMalloc failed");
  }
  cudaMemcpy(dx.ptr, const_cast<TypedBuffer&>(x).data(), bytes, cudaMemcpyHostToDevice);
  cudaMemset(dy.ptr, 0xff, bytes);
  const DeviceLoc dev = gpu.location();
  absl::Status s =
      gpu.Run(plan, {{dx.ptr, bytes, dev}, {dy.ptr, bytes, dev}}, {ws.ptr, ws.bytes, dev});
  if (!s.ok()) return s;
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
    return absl::InternalError(cudaGetErrorString(e));
  }
  if (cudaError_t e = cudaMemcpy(y->data(), dy.ptr, bytes, cudaMemcpyDeviceToHost);
      e != cudaSuccess) {
    return absl::InternalError(cudaGetErrorString(e));
  }
  return absl::OkStatus();
}

// `count` random problems of up to `max_seq_len` tokens per sequence; returns how many the GPU
// path took. Head dims without a fused kernel (8, 24, 40, 96) run padded to one.
int CompareRandom(int count, int64_t max_seq_len) {
  absl::StatusOr<std::unique_ptr<MultiheadBackend>> gpu = CreateCudaMultiheadBackend({0, nullptr});
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (!gpu.ok()) return 0;
  const uint64_t seed = testing::TestSeed();
  SplitMix64 rng(seed);
  testing::RandomCaseLimits lim;
  lim.max_seq_len = max_seq_len;
  lim.max_heads = 4;
  lim.head_dims = {16, 32, 64, 128, 8, 24, 40, 96};
  lim.dtypes = {attention::DType::kFloat16, attention::DType::kBFloat16};
  // A few weight sets, each reused across cases and dtypes (the backend caches its uploads).
  std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const MultiheadWeights>> weights;
  int cases = 0;
  for (int i = 0; i < count; ++i) {
    testing::RandomCase c = testing::DrawCase(rng, lim);
    const int64_t e = c.shape.num_heads * c.shape.head_dim;
    auto& w = weights[{c.shape.num_heads, c.shape.head_dim}];
    if (w == nullptr) {
      w = testing::RandomWeights(rng, e, c.shape.num_heads, rng.Uniform(0, 1) == 1, true);
    }
    EXPECT_NE(w, nullptr);
    absl::StatusOr<MultiheadPlan> plan = PlanMultihead(w, c.options, c.shape);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return cases;
    if (!(*gpu)->Supports(*plan).ok()) continue;
    ++cases;
    const size_t n = plan->tensor_bytes / attention::DTypeSize(c.shape.dtype);
    TypedBuffer x(c.shape.dtype, n), y(c.shape.dtype, n), ref(c.shape.dtype, n),
        exact(c.shape.dtype, n);
    for (size_t j = 0; j < n; ++j) x.Set(j, rng.NextFloat(c.input_scale));
    // Against a reference storing where the GPU stores, in its dtype: the conformance tolerance.
    EXPECT_TRUE(ReferenceMultihead(*plan, {x.cref(), ref.ref()}, c.shape.dtype).ok());
    // Against the definition (fp32 storage): the chain rounds six times (weights, Q / K / V, the
    // attention's output, the norm's, Y), which a norm can amplify, so four times that.
    EXPECT_TRUE(ReferenceMultihead(*plan, {x.cref(), exact.ref()}).ok());
    absl::Status s = RunOnGpu(**gpu, *plan, x, &y);
    EXPECT_TRUE(s.ok()) << s << " " << c.Describe();
    if (!s.ok()) return cases;
    const std::vector<float> out = y.ToFloats();
    const testing::ErrorReport err = testing::RelativeError(out, ref.ToFloats());
    const testing::ErrorReport def = testing::RelativeError(out, exact.ToFloats());
    const double tol = testing::Tolerance(c.shape.dtype);
    EXPECT_TRUE(err.ok(tol) && def.ok(4 * tol))
        << c.Describe() << " E=" << e << " norm=" << w->layer_norm << ": relative error "
        << err.relative << " (same storage), " << def.relative << " (fp32 storage), "
        << err.nan_count << " NaN; seed " << seed << " case " << i;
  }
  return cases;
}

TEST(CudaMultihead, MatchesTheReferenceOnRandomProblems) {
  REQUIRE_GPU();
  EXPECT_GT(CompareRandom(120, 300), 100);
}

// Kept small on purpose: run under compute-sanitizer by the device scripts.
TEST(CudaMultihead, SanitizerSet) {
  REQUIRE_GPU();
  EXPECT_GT(CompareRandom(5, 100), 0);
}

// Two backends of one device (an executor's two streams) share one upload of the weights; each
// runs right with it, before and after the other is gone, and in both dtypes.
TEST(CudaMultihead, BackendsOfADeviceShareTheirWeights) {
  REQUIRE_GPU();
  SplitMix64 rng(21);
  auto w = testing::RandomWeights(rng, 128, 2, true, true);
  attention::AttentionOptions o;
  o.segment_lengths = {64, 128};
  o.dilation_rates = {1, 2};
  for (attention::DType dtype : {attention::DType::kBFloat16, attention::DType::kFloat16}) {
    absl::StatusOr<MultiheadPlan> plan =
        PlanMultihead(w, o, attention::DenseShape(dtype, 2, 200, 2, 64));
    ASSERT_TRUE(plan.ok());
    const size_t n = plan->tensor_bytes / attention::DTypeSize(dtype);
    TypedBuffer x(dtype, n), ref(dtype, n), a(dtype, n), b(dtype, n);
    for (size_t j = 0; j < n; ++j) x.Set(j, rng.NextFloat(1));
    ASSERT_TRUE(ReferenceMultihead(*plan, {x.cref(), ref.ref()}, dtype).ok());
    auto first = CreateCudaMultiheadBackend({0, nullptr});
    auto second = CreateCudaMultiheadBackend({0, nullptr});
    ASSERT_TRUE(first.ok() && second.ok());
    ASSERT_TRUE(RunOnGpu(**first, *plan, x, &a).ok());
    ASSERT_TRUE(RunOnGpu(**second, *plan, x, &b).ok());
    first->reset();
    TypedBuffer c(dtype, n);
    ASSERT_TRUE(RunOnGpu(**second, *plan, x, &c).ok());
    const std::vector<float> fa = a.ToFloats(), fb = b.ToFloats(), fc = c.ToFloats();
    EXPECT_EQ(fa, fb);
    EXPECT_EQ(fb, fc);
    EXPECT_TRUE(testing::RelativeError(fa, ref.ToFloats()).ok(testing::Tolerance(dtype)));
  }
}

TEST(CudaMultihead, SelectorRefusesWhatItCannotRun) {
  REQUIRE_GPU();
  absl::StatusOr<std::unique_ptr<MultiheadBackend>> gpu = CreateCudaMultiheadBackend({0, nullptr});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  SplitMix64 rng(1);
  attention::AttentionOptions o;
  o.segment_lengths = {64};
  o.dilation_rates = {2};
  auto w = testing::RandomWeights(rng, 128, 2, true, true);
  absl::StatusOr<MultiheadPlan> fp32 =
      PlanMultihead(w, o, attention::DenseShape(attention::DType::kFloat32, 1, 64, 2, 64));
  ASSERT_TRUE(fp32.ok());
  EXPECT_THAT(std::string((*gpu)->Supports(*fp32).message()), ::testing::HasSubstr("fp16 or bf16"));
  auto odd = testing::RandomWeights(rng, 12, 3, false, true);  // rows of 24 bytes
  absl::StatusOr<MultiheadPlan> small =
      PlanMultihead(odd, o, attention::DenseShape(attention::DType::kFloat16, 1, 64, 3, 4));
  ASSERT_TRUE(small.ok());
  EXPECT_THAT(std::string((*gpu)->Supports(*small).message()),
              ::testing::HasSubstr("not a multiple of 8"));
  auto wide = testing::RandomWeights(rng, 528, 2, false, true);  // D = 264: above every kernel
  absl::StatusOr<MultiheadPlan> big =
      PlanMultihead(wide, o, attention::DenseShape(attention::DType::kFloat16, 1, 64, 2, 264));
  ASSERT_TRUE(big.ok());
  EXPECT_THAT(std::string((*gpu)->Supports(*big).message()), ::testing::HasSubstr("head_dim"));
}

}  // namespace
}  // namespace dilattn::multihead
