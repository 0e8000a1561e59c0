// The multihead module on the CPU: the safetensors reader against well-formed and hostile files,
// weight loading, and the CPU backend against the float64 reference on random problems.

#include "kernels/multihead/multihead.h"

#include <cmath>
#include <cstring>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/common/multihead_util.h"
#include "tests/common/random_config.h"

namespace dilattn::multihead {
namespace {

using ::dilattn::testing::NamedTensor;
using ::dilattn::testing::SafetensorsBytes;
using ::dilattn::testing::SplitMix64;
using ::testing::HasSubstr;

std::string WithHeader(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

TEST(Safetensors, ReadsEveryFloatTypeExactly) {
  const std::vector<float> values = {1.5f, -2.25f, 0.0f, 65504.0f, -0.0009765625f, 3.0f};
  const std::string bytes = SafetensorsBytes(
      {{"a", {2, 3}, values, "F32"}, {"b", {6}, values, "F16"}, {"c", {3, 2}, values, "BF16"}});
  absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(bytes, "t");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->entries().size(), 3u);
  absl::StatusOr<std::vector<float>> a = f->ReadFloat("a", {2, 3});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a, values);
  absl::StatusOr<std::vector<float>> b = f->ReadFloat("b", {6});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, values);  // every value is exact in fp16
  absl::StatusOr<std::vector<float>> c = f->ReadFloat("c", {3, 2});
  ASSERT_TRUE(c.ok()) << c.status();
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ((*c)[i], attention::BFloat16BitsToFloat(attention::FloatToBFloat16Bits(values[i])));
  }
  EXPECT_TRUE(absl::IsNotFound(f->ReadFloat("d", {1}).status()));
  EXPECT_THAT(std::string(f->ReadFloat("a", {3, 2}).status().message()),
              HasSubstr("has shape [2, 3]; expected [3, 2]"));
}

TEST(Safetensors, EmptyHeaderIsAFileWithoutTensors) {
  absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(WithHeader("{}"), "t");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(f->entries().empty());
  f = SafetensorsFile::Parse(WithHeader(" { \"__metadata__\" : { \"x\" : \"\\u00e9\\n\" } } "),
                             "t");
  ASSERT_TRUE(f.ok()) << f.status();
}

TEST(Safetensors, RejectsHostileFilesByName) {
  const std::string good = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
  const std::string data(8, '\0');
  struct Case {
    std::string bytes;
    const char* expect;
  } cases[] = {
      {"", "only 0 bytes"},
      {std::string("\x10\0\0\0\0\0\0\0", 8), "exceeds the file"},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10), "exceeds the file"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", data),
       "lie outside"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", data),
       "lie outside"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", data),
       "spans 8 bytes, not 3 x 4"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
                  "\"data_offsets\":[0,8]}}",
                  data),
       "overflows"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", data), "needs dtype, shape and"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", data),
       "non-negative integer"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}", data),
       "found a fraction"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],"
                  "\"data_offsets\":[0,8]}}",
                  data),
       "integer too large"},
      {WithHeader(good.substr(0, good.size() - 1), data), "expected '}'"},
      {WithHeader("{\"w", data), "unterminated string"},
      {WithHeader(good + "x", data), "text after the header"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                  data),
       "listed twice"},
      {WithHeader("{\"__metadata__\":" + std::string(50, '[') + std::string(50, ']') + "}", data),
       "nesting too deep"},
      {WithHeader("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,9]}}", data),
       "two integers"},
      {WithHeader("{\"a\\q\":1}", data), "bad escape"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(c.bytes, "evil.safetensors");
    ASSERT_FALSE(f.ok()) << c.expect;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(c.expect));
    EXPECT_THAT(std::string(f.status().message()), HasSubstr("evil.safetensors"));
  }
}

TEST(Safetensors, RefusesNonFiniteWeightsAndOtherDtypes) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::string bytes = SafetensorsBytes({{"w", {2}, {1.0f, inf}, "F32"}});
  absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(bytes, "t");
  ASSERT_TRUE(f.ok());
  EXPECT_THAT(std::string(f->ReadFloat("w", {2}).status().message()),
              HasSubstr("non-finite value at element 1"));
  f = SafetensorsFile::Parse(
      WithHeader("{\"w\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                 std::string(8, '\0')),
      "t");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT(std::string(f->ReadFloat("w", {2}).status().message()),
              HasSubstr("has dtype I32; supported: F32, F16, BF16"));
}

// Every truncation and many single-byte corruptions of a valid file either parse or fail with a
// status: never a crash, never a read outside the buffer (ASan in CI).
TEST(Safetensors, CorruptedFilesNeverCrash) {
  SplitMix64 rng(7);
  const std::string good =
      SafetensorsBytes(testing::RandomWeightTensors(rng, 4, true, true, "layers.0."));
  for (size_t n = 0; n < good.size(); n += 3) {
    (void)SafetensorsFile::Parse(good.substr(0, n), "t");
  }
  for (int i = 0; i < 3000; ++i) {
    std::string bad = good;
    const size_t at = static_cast<size_t>(rng.Uniform(0, static_cast<int64_t>(bad.size()) - 1));
    bad[at] = static_cast<char>(rng.Uniform(0, 255));
    absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(bad, "t");
    if (f.ok()) (void)LoadWeights(*f, {2, "layers.0.", 1e-5});
  }
}

TEST(MultiheadWeights, LoadsTorchscaleAndDapNamesUnderAPrefix) {
  SplitMix64 rng(3);
  const std::vector<NamedTensor> t = testing::RandomWeightTensors(rng, 8, true, true, "m.");
  absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(SafetensorsBytes(t), "t");
  ASSERT_TRUE(f.ok());
  absl::StatusOr<std::shared_ptr<const MultiheadWeights>> w = LoadWeights(*f, {2, "m.", 1e-6});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->embed_dim, 8);
  EXPECT_EQ((*w)->num_heads, 2);
  EXPECT_TRUE((*w)->layer_norm);
  EXPECT_EQ((*w)->layer_norm_eps, 1e-6);
  // Stored transposed: wt[i][o] = W[o][i].
  EXPECT_EQ((*w)->wt_q[1 * 8 + 3], t[0].values[3 * 8 + 1]);
  EXPECT_EQ((*w)->b_q, t[1].values);

  const std::vector<NamedTensor> dap =
      testing::RandomWeightTensors(rng, 8, true, false, "", "norm");
  f = SafetensorsFile::Parse(SafetensorsBytes(dap), "t");
  ASSERT_TRUE(f.ok());
  w = LoadWeights(*f, {4, "", 1e-5});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE((*w)->layer_norm);
  EXPECT_EQ((*w)->b_out, std::vector<float>(8, 0.0f));  // no biases in the file
  const uint64_t first = (*w)->id;
  w = LoadWeights(*f, {4, "", 1e-5});
  ASSERT_TRUE(w.ok());
  EXPECT_NE((*w)->id, first);
}

TEST(MultiheadWeights, RejectsInconsistentFilesByName) {
  SplitMix64 rng(5);
  auto load = [](const std::vector<NamedTensor>& t, int64_t heads) {
    absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(SafetensorsBytes(t), "w.st");
    EXPECT_TRUE(f.ok());
    return LoadWeights(*f, {heads, "", 1e-5}).status();
  };
  std::vector<NamedTensor> t = testing::RandomWeightTensors(rng, 6, false, true);
  EXPECT_THAT(std::string(load(t, 4).message()), HasSubstr("E=6 is not a multiple of num_heads=4"));
  EXPECT_THAT(std::string(load({}, 1).message()), HasSubstr("no tensor 'q_proj.weight'"));
  std::vector<NamedTensor> missing(t.begin(), t.end() - 2);  // no out_proj
  EXPECT_THAT(std::string(load(missing, 2).message()), HasSubstr("'out_proj.weight'"));
  std::vector<NamedTensor> wide = t;
  wide[0].shape = {6, 3};
  wide[0].values.resize(18);
  EXPECT_THAT(std::string(load(wide, 2).message()), HasSubstr("square (E, E)"));
  std::vector<NamedTensor> bias = t;
  bias[1].shape = {3, 2};
  EXPECT_THAT(std::string(load(bias, 2).message()), HasSubstr("'q_proj.bias' has shape [3, 2]"));
  std::vector<NamedTensor> both = t;
  both.push_back({"norm.weight", {6}, std::vector<float>(6, 1)});
  both.push_back({"inner_attn_ln.weight", {6}, std::vector<float>(6, 1)});
  EXPECT_THAT(std::string(load(both, 2).message()), HasSubstr("keep one sub-layer norm"));
  absl::StatusOr<SafetensorsFile> f = SafetensorsFile::Parse(SafetensorsBytes(t), "w.st");
  ASSERT_TRUE(f.ok());
  EXPECT_THAT(std::string(LoadWeights(*f, {2, "", 0}).status().message()),
              HasSubstr("layer_norm_eps=0"));
  EXPECT_THAT(
      std::string(LoadWeightsFile("/nonexistent/w.safetensors", {2, "", 1e-5}).status().message()),
      HasSubstr("cannot be opened"));
  // Read to its end, a device would never end (or end memory first); a directory never parses.
  for (const char* special : {"/dev/zero", "/"}) {
    EXPECT_THAT(std::string(LoadWeightsFile(special, {2, "", 1e-5}).status().message()),
                HasSubstr("is not a regular file"));
  }
}

TEST(MultiheadPlan, ChecksHeadsAndEmbedDimAgainstTheWeights) {
  SplitMix64 rng(9);
  auto w = testing::RandomWeights(rng, 8, 2, false, true);
  ASSERT_NE(w, nullptr);
  attention::AttentionOptions o;
  o.segment_lengths = {4};
  o.dilation_rates = {1};
  EXPECT_TRUE(
      PlanMultihead(w, o, attention::DenseShape(attention::DType::kFloat32, 1, 8, 2, 4)).ok());
  absl::Status s =
      PlanMultihead(w, o, attention::DenseShape(attention::DType::kFloat32, 1, 8, 4, 2)).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("have E=8 and H=2"));
  o.dilation_rates = {9};
  s = PlanMultihead(w, o, attention::DenseShape(attention::DType::kFloat32, 1, 8, 2, 4)).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

// Random problems on every instruction set this CPU runs, against the float64 reference.
TEST(CpuMultihead, MatchesTheReferenceOnRandomProblems) {
  const uint64_t seed = testing::TestSeed();
  SplitMix64 rng(seed);
  std::vector<std::unique_ptr<MultiheadBackend>> backends;
  for (const char* isa : {"generic", "avx2", "avx512"}) {
    absl::StatusOr<std::unique_ptr<MultiheadBackend>> b = CreateCpuMultiheadBackend({3, isa});
    if (b.ok()) backends.push_back(*std::move(b));
  }
  ASSERT_FALSE(backends.empty());
  testing::RandomCaseLimits lim;
  lim.max_seq_len = 90;
  lim.max_heads = 4;
  lim.head_dims = {1, 4, 8, 16, 24};
  for (int i = 0; i < 60; ++i) {
    testing::RandomCase c = testing::DrawCase(rng, lim);
    const int64_t e = c.shape.num_heads * c.shape.head_dim;
    // The sub-layer norm only where E >= 8: over two values it gives +-1 whatever their
    // difference, so where they nearly agree fp32's rounding of them comes out amplified past
    // fp32's tolerance (seen at E = 2, about once in 2000 runs), which no implementation avoids.
    const bool norm = rng.Uniform(0, 1) == 1 && e >= 8;
    auto w = testing::RandomWeights(rng, e, c.shape.num_heads, norm, rng.Uniform(0, 2) != 0);
    ASSERT_NE(w, nullptr);
    absl::StatusOr<MultiheadPlan> plan = PlanMultihead(w, c.options, c.shape);
    ASSERT_TRUE(plan.ok()) << plan.status() << " " << c.Describe();
    const size_t n = plan->tensor_bytes / attention::DTypeSize(c.shape.dtype);
    testing::TypedBuffer x(c.shape.dtype, n), ref(c.shape.dtype, n);
    for (size_t j = 0; j < n; ++j) x.Set(j, rng.NextFloat(c.input_scale));
    ASSERT_TRUE(ReferenceMultihead(*plan, {x.cref(), ref.ref()}).ok());
    for (auto& b : backends) {
      testing::TypedBuffer y(c.shape.dtype, n);
      y.Poison();
      std::vector<unsigned char> ws(b->WorkspaceBytes(*plan) + 64);
      auto* aligned =
          reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(ws.data()) + 63) / 64 * 64);
      ASSERT_TRUE(b->Supports(*plan).ok());
      absl::Status s = b->Run(*plan, {x.cref(), y.ref()},
                              {aligned, b->WorkspaceBytes(*plan), DeviceLoc::Host()});
      ASSERT_TRUE(s.ok()) << s;
      const testing::ErrorReport err = testing::RelativeError(y.ToFloats(), ref.ToFloats());
      EXPECT_TRUE(err.ok(testing::Tolerance(c.shape.dtype)))
          << b->name() << " " << c.Describe() << " E=" << e << " norm=" << w->layer_norm
          << ": relative error " << err.relative << ", " << err.nan_count << " NaN; seed " << seed
          << " case " << i;
    }
  }
}

TEST(CpuMultihead, RefusesWrongSizesAndAShortWorkspace) {
  SplitMix64 rng(11);
  auto w = testing::RandomWeights(rng, 8, 2, false, true);
  absl::StatusOr<std::unique_ptr<MultiheadBackend>> b = CreateCpuMultiheadBackend({1, "auto"});
  ASSERT_TRUE(b.ok());
  attention::AttentionOptions o;
  o.segment_lengths = {4};
  o.dilation_rates = {1};
  absl::StatusOr<MultiheadPlan> plan =
      PlanMultihead(w, o, attention::DenseShape(attention::DType::kFloat32, 1, 8, 2, 4));
  ASSERT_TRUE(plan.ok());
  testing::TypedBuffer x(attention::DType::kFloat32, 64), y(attention::DType::kFloat32, 64);
  std::vector<float> ws((*b)->WorkspaceBytes(*plan) / 4 + 16);
  EXPECT_THAT(
      std::string(
          (*b)->Run(*plan, {x.cref(), y.ref()}, {ws.data(), 16, DeviceLoc::Host()}).message()),
      HasSubstr("workspace of 16 bytes"));
  testing::TypedBuffer small(attention::DType::kFloat32, 32);
  EXPECT_THAT(std::string((*b)->Run(*plan, {small.cref(), y.ref()},
                                    {ws.data(), ws.size() * 4, DeviceLoc::Host()})
                              .message()),
              HasSubstr("X and Y must hold 256 bytes"));
}

}  // namespace
}  // namespace dilattn::multihead
