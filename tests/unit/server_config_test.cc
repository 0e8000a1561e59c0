// Model configs and operator parameters: the built-in models parse, every config mistake is
// rejected at start-up with its reason, and parameter values convert as documented.

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/model_config.h"
#include "server/operator_options.h"
#include "tests/common/multihead_util.h"

namespace dilattn::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(ModelConfig, BuiltInModels) {
  const std::vector<ModelSpec> models = DefaultModels();
  ASSERT_EQ(models.size(), 3u);
  EXPECT_EQ(models[0].name, "dilated_attention");
  EXPECT_EQ(models[0].defaults.dilated.mode, attention::Mode::kLongNet);
  EXPECT_EQ(models[0].defaults.dilated.segment_lengths,
            (std::vector<int64_t>{2048, 4096, 8192, 16384, 32768}));
  EXPECT_EQ(models[1].name, "dilated_attention_head_groups");
  EXPECT_EQ(models[1].defaults.dilated.mode, attention::Mode::kHeadGroups);
  EXPECT_EQ(models[2].name, "block_sparse_attention");
  EXPECT_EQ(models[2].defaults.kind, OperatorKind::kBlockSparse);
  for (const ModelSpec& m : models) {
    EXPECT_EQ(m.config.input_size(), 3);
    EXPECT_EQ(m.config.output(0).name(), "O");
    EXPECT_GT(m.batching.max_batch_size, 0);
  }
}

TEST(ModelConfig, DefaultsFillInputsAndBatching) {
  absl::StatusOr<ModelSpec> spec = ParseModelConfig(R"pb(
    max_batch_size: 8
    dynamic_batching { preferred_batch_size: [4, 2] max_queue_delay_microseconds: 300
                       priority_levels: 3 default_queue_policy { max_queue_size: 7 } }
    parameters { key: "segment_lengths" value { string_value: "64, 128" } }
    parameters { key: "dilation_rates" value { string_value: "1,2" } }
  )pb", "test", "mine");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name, "mine");
  EXPECT_EQ(spec->config.input(1).name(), "K");
  EXPECT_EQ(spec->dims, (std::array<int64_t, 3>{-1, -1, -1}));
  EXPECT_EQ(spec->batching.preferred_batch_sizes, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(spec->batching.max_queue_delay, absl::Microseconds(300));
  EXPECT_EQ(spec->batching.priority_levels, 3);
  EXPECT_EQ(spec->batching.default_priority, 2);
  EXPECT_EQ(spec->batching.max_queue_size, 7u);
}

void ExpectRejected(const std::string& text, const std::string& needle) {
  absl::StatusOr<ModelSpec> spec = ParseModelConfig(text, "cfg.pbtxt", "m");
  ASSERT_FALSE(spec.ok()) << text;
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr(needle));
}

// Q, K and V declared FP16 with `dims` ("[-1, 8, 64]"), as config text.
std::string Fp16Inputs(const std::string& dims) {
  std::string out;
  for (const char* name : {"Q", "K", "V"}) {
    absl::StrAppend(&out, "input { name: \"", name, "\" data_type: TYPE_FP16 dims: ", dims, " }\n");
  }
  return out;
}

TEST(ModelConfig, Rejections) {
  ExpectRejected("optimization { }", "line 1");
  ExpectRejected("name: \"other\"", "differs from its directory 'm'");
  ExpectRejected("backend: \"onnxruntime\"", "backend 'onnxruntime'");
  ExpectRejected("parameters { key: \"operator\" value { string_value: \"conv\" } }",
                 "operator='conv'");
  ExpectRejected("parameters { key: \"segment_lengths\" value { string_value: \"8,x\" } }",
                 "'segment_lengths'='8,x'");
  ExpectRejected("parameters { key: \"segment_lengths\" value { string_value: \"4\" } }\n"
                 "parameters { key: \"dilation_rates\" value { string_value: \"8\" } }",
                 "dilation_rates[0]=8");
  ExpectRejected("parameters { key: \"max_batch_tokens\" value { string_value: \"0\" } }",
                 "max_batch_tokens");
  ExpectRejected("dynamic_batching { }", "needs max_batch_size > 0");
  ExpectRejected("max_batch_size: 4 dynamic_batching { preferred_batch_size: [8] }",
                 "preferred_batch_size 8");
  ExpectRejected("max_batch_size: 4 dynamic_batching { default_queue_policy { timeout_action: DELAY } }",
                 "DELAY is not supported");
  ExpectRejected("max_batch_size: 4 input { name: \"Q\" data_type: TYPE_FP32 dims: [-1,-1,-1] }",
                 "exactly Q, K and V");
  ExpectRejected(R"pb(max_batch_size: 4
      input { name: "Q" data_type: TYPE_INT8 dims: [-1, -1, -1] }
      input { name: "K" data_type: TYPE_INT8 dims: [-1, -1, -1] }
      input { name: "V" data_type: TYPE_INT8 dims: [-1, -1, -1] })pb",
                 "TYPE_INT8");
  ExpectRejected(R"pb(max_batch_size: 4
      input { name: "Q" data_type: TYPE_FP16 dims: [-1, 8, 64] }
      input { name: "K" data_type: TYPE_FP16 dims: [-1, 8, 64] }
      input { name: "V" data_type: TYPE_FP16 dims: [-1, 8] })pb",
                 "has 2 dims");
  // uint64 values in the proto that would wrap when narrowed: to level 1, to no delay, to no
  // timeout.
  ExpectRejected(
      "max_batch_size: 4 dynamic_batching { priority_levels: 2 "
      "default_priority_level: 4294967297 }",
      "default_priority_level 4294967297 is outside [1, 2]");
  ExpectRejected(
      "max_batch_size: 4 dynamic_batching { "
      "max_queue_delay_microseconds: 18446744073709551615 }",
      "max_queue_delay_microseconds 18446744073709551615 exceeds");
  ExpectRejected(
      "max_batch_size: 4 dynamic_batching { default_queue_policy { "
      "default_timeout_microseconds: 9223372036854775808 } }",
      "default_timeout_microseconds 9223372036854775808 exceeds");
  ExpectRejected("max_batch_size: 4 " + Fp16Inputs("[-1, 8, 64]") +
                     "output { name: \"O\" data_type: TYPE_FP16 dims: [0, -7] }",
                 "output O declares dims [0, -7]; it must declare the inputs' [-1, 8, 64]");
  // Operator defaults that no request could ever run with are start-up errors, also where the
  // requests bring part of the problem: the explicit pattern's pairs, or H and D.
  for (const auto& [key, value, needle] :
       {std::tuple{"block_size", "0", "block_size must be >= 1, got 0"},
        std::tuple{"softmax_scale", "nan", "softmax_scale must be finite"}}) {
    ExpectRejected(absl::StrCat(R"pb(parameters {
                                       key: "operator"
                                       value { string_value: "block_sparse" }
                                     }
                                     parameters {
                                       key: "pattern"
                                       value { string_value: "explicit" }
                                     }
                                     parameters { key: ")pb",
                                key, "\" value { string_value: \"", value, "\" } }"),
                   needle);
  }
  ExpectRejected("max_batch_size: 4 " + Fp16Inputs("[-1, 2, 64]") +
                     R"pb(parameters {
                            key: "mode"
                            value { string_value: "head_groups" }
                          }
                          parameters {
                            key: "segment_lengths"
                            value { string_value: "16,32,64" }
                          }
                          parameters {
                            key: "dilation_rates"
                            value { string_value: "1,2,4" }
                          })pb",
                 "num_heads");
}

// Fields Triton acts on and dilattn does not are accepted (configs written for Triton carry
// them), and the start-up warning names each one set to something that would matter in Triton.
TEST(ModelConfig, IgnoredTritonFieldsAreAcceptedAndNamed) {
  // As Triton's configs write them, one message to a line.
  const std::string tensors = R"(
    max_batch_size: 4
    input { name: "Q" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] optional: true }
    input { name: "K" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }
    input { name: "V" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] optional: false }
    parameters { key: "segment_lengths" value { string_value: "64" } }
    parameters { key: "dilation_rates" value { string_value: "1" } })";
  const std::string triton = R"(
    platform: "onnxruntime_onnx"
    instance_group { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] }
    instance_group { kind: KIND_CPU }
    dynamic_batching { preserve_ordering: true })";
  absl::StatusOr<ModelSpec> spec = ParseModelConfig(triton + tensors, "test", "m");
  ASSERT_TRUE(spec.ok()) << spec.status();
  const std::string warning = IgnoredConfigFieldsWarning(spec->config);
  EXPECT_THAT(warning, HasSubstr("model 'm': config fields ignored: "));
  EXPECT_THAT(warning, HasSubstr("platform \"onnxruntime_onnx\""));
  EXPECT_THAT(warning, HasSubstr("instance_group 3 instances, gpus [0, 1], kind KIND_CPU ("));
  EXPECT_THAT(warning, HasSubstr("dynamic_batching.preserve_ordering: true"));
  EXPECT_THAT(warning, HasSubstr("input Q optional: true"));
  EXPECT_THAT(warning, Not(HasSubstr("input V")));
  EXPECT_THAT(warning, Not(HasSubstr("input K")));

  // What Triton would do as dilattn does: nothing to say.
  const std::string as_here = R"(
    instance_group { count: 1 kind: KIND_GPU }
    dynamic_batching { preserve_ordering: false })";
  spec = ParseModelConfig(as_here + tensors, "test", "m");
  ASSERT_TRUE(spec.ok()) << spec.status();
  spec->config.mutable_input(0)->set_optional(false);
  EXPECT_EQ(IgnoredConfigFieldsWarning(spec->config), "");
  for (const ModelSpec& m : DefaultModels()) {
    EXPECT_EQ(IgnoredConfigFieldsWarning(m.config), "") << m.name;
  }
}

TEST(ModelConfig, BatchingIsDynamicOnlyWithDynamicBatching) {
  const std::string branches = R"pb(
    parameters {
      key: "segment_lengths"
      value { string_value: "64" }
    }
    parameters {
      key: "dilation_rates"
      value { string_value: "1" }
    })pb";
  absl::StatusOr<ModelSpec> alone = ParseModelConfig("max_batch_size: 8" + branches, "test", "m");
  ASSERT_TRUE(alone.ok()) << alone.status();
  EXPECT_FALSE(alone->batching.dynamic);
  EXPECT_EQ(alone->batching.max_batch_size, 8);  // still bounds each request's B
  absl::StatusOr<ModelSpec> dynamic =
      ParseModelConfig("max_batch_size: 8 dynamic_batching {}" + branches, "test", "m");
  ASSERT_TRUE(dynamic.ok()) << dynamic.status();
  EXPECT_TRUE(dynamic->batching.dynamic);
  // An explicit pattern without pairs in the config is fine: requests bring them.
  absl::StatusOr<ModelSpec> sparse = ParseModelConfig(
      R"pb(parameters {
             key: "operator"
             value { string_value: "block_sparse" }
           }
           parameters {
             key: "pattern"
             value { string_value: "explicit" }
           })pb",
      "test", "m");
  EXPECT_TRUE(sparse.ok()) << sparse.status();
}

// A config.pbtxt that is no small regular file is refused by name before it is read: read to its
// end, /dev/zero would exhaust memory and a FIFO would hang the start-up.
TEST(ModelRepository, RefusesConfigsThatAreNoSmallRegularFile) {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::path(::testing::TempDir()) /
      absl::StrCat("repo_special_", ::testing::UnitTest::GetInstance()->random_seed());
  fs::remove_all(dir);
  fs::create_directories(dir / "m");
  const fs::path config = dir / "m" / "config.pbtxt";
  fs::create_symlink("/dev/zero", config);
  absl::Status s = LoadModelRepository(dir.string()).status();
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("config.pbtxt is not a regular file"));
  fs::remove(config);
  std::ofstream(config) << std::string((1 << 20) + 1, ' ');
  s = LoadModelRepository(dir.string()).status();
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("config.pbtxt holds 1048577 bytes, more than a model config's 1 MiB"));
  fs::remove_all(dir);
}

// A model repository of one multihead model with random weights, in a fresh directory.
class MultiheadRepository : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrCat("mh_repo_", ::testing::UnitTest::GetInstance()->random_seed(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ / "mha");
    testing::SplitMix64 rng(3);
    std::ofstream(dir_ / "mha" / "weights.safetensors", std::ios::binary)
        << testing::SafetensorsBytes(testing::RandomWeightTensors(rng, 32, true, true, "attn."));
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  absl::StatusOr<std::vector<ModelSpec>> Load(const std::string& config) {
    std::ofstream(dir_ / "mha" / "config.pbtxt") << config;
    return LoadModelRepository(dir_.string());
  }

  std::filesystem::path dir_;
};

constexpr const char* kMultiheadParams = R"pb(
  parameters {
    key: "operator"
    value { string_value: "multihead_dilated_attention" }
  }
  parameters {
    key: "weights"
    value { string_value: "weights.safetensors" }
  }
  parameters {
    key: "weights_prefix"
    value { string_value: "attn." }
  }
  parameters {
    key: "num_heads"
    value { string_value: "4" }
  }
  parameters {
    key: "segment_lengths"
    value { string_value: "16,32" }
  }
  parameters {
    key: "dilation_rates"
    value { string_value: "1,2" }
  }
)pb";

TEST_F(MultiheadRepository, LoadsWeightsBesideTheConfig) {
  absl::StatusOr<std::vector<ModelSpec>> specs =
      Load(absl::StrCat("max_batch_size: 4\n", kMultiheadParams));
  ASSERT_TRUE(specs.ok()) << specs.status();
  const ModelSpec& m = (*specs)[0];
  EXPECT_TRUE(m.hidden_states());
  EXPECT_EQ(m.input_names(), std::vector<std::string>{"X"});
  EXPECT_EQ(m.output_name(), "Y");
  ASSERT_EQ(m.config.input_size(), 1);
  EXPECT_EQ(m.config.input(0).name(), "X");
  EXPECT_EQ(m.config.input(0).dims_size(), 2);  // [N, E] under max_batch_size
  EXPECT_EQ(m.config.output(0).name(), "Y");
  EXPECT_EQ(m.dims, (std::array<int64_t, 3>{-1, 4, 8}));
  ASSERT_NE(m.defaults.weights, nullptr);
  EXPECT_TRUE(m.defaults.weights->layer_norm);
  EXPECT_EQ(m.defaults.dilated.segment_lengths, (std::vector<int64_t>{16, 32}));
  // The weights are the model's: a request may change the attention's options, not them.
  OperatorOptions o = m.defaults;
  EXPECT_TRUE(ApplyOperatorParameter("causal", ParamValue(true), "request parameter", &o).ok());
  EXPECT_THAT(std::string(ApplyOperatorParameter("weights", ParamValue(std::string("x")),
                                                 "request parameter", &o)
                              .message()),
              HasSubstr("not known for multihead dilated attention"));
  OperatorOptions other = m.defaults;
  testing::SplitMix64 rng(1);
  other.weights = testing::RandomWeights(rng, 32, 4, false, true);
  EXPECT_NE(OperatorKey(o), OperatorKey(m.defaults));
  EXPECT_NE(OperatorKey(other), OperatorKey(m.defaults));
}

TEST_F(MultiheadRepository, RejectsWhatCannotServe) {
  auto rejected = [&](const std::string& config, const std::string& needle) {
    absl::StatusOr<std::vector<ModelSpec>> specs = Load(config);
    ASSERT_FALSE(specs.ok()) << config;
    EXPECT_EQ(specs.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(specs.status().message()), HasSubstr(needle)) << config;
  };
  const std::string op = R"pb(parameters {
                                key: "operator"
                                value { string_value: "multihead_dilated_attention" }
                              })pb";
  rejected(op, "needs parameters 'weights' (a safetensors file) and 'num_heads'");
  rejected(absl::StrCat(op, R"pb(parameters {
                                   key: "weights"
                                   value { string_value: "w.st" }
                                 }
                                 parameters {
                                   key: "num_heads"
                                   value { string_value: "x" }
                                 })pb"),
           "num_heads='x'");
  rejected(absl::StrCat(op, R"pb(parameters {
                                   key: "weights"
                                   value { string_value: "nope" }
                                 }
                                 parameters {
                                   key: "num_heads"
                                   value { string_value: "4" }
                                 })pb"),
           "cannot be opened");
  rejected(absl::StrCat(op, R"pb(parameters {
                                   key: "weights"
                                   value { string_value: "weights.safetensors" }
                                 }
                                 parameters {
                                   key: "num_heads"
                                   value { string_value: "4" }
                                 })pb"),
           "no tensor 'q_proj.weight'");  // the prefix is missing
  rejected(absl::StrCat("max_batch_size: 4\n", kMultiheadParams, R"pb(input {
                                                                        name: "X"
                                                                        data_type: TYPE_FP16
                                                                        dims: [ -1, 64 ]
                                                                      })pb"),
           "declares E=64 but the weights have E=32");
  rejected(absl::StrCat("max_batch_size: 4\n", kMultiheadParams, R"pb(input {
                                                                        name: "Q"
                                                                        data_type: TYPE_FP16
                                                                        dims: [ -1, 32 ]
                                                                      })pb"),
           "inputs must be exactly X");
  rejected(absl::StrCat(kMultiheadParams,
                        R"pb(input {
                               name: "X"
                               data_type: TYPE_FP16
                               dims: [ -1, -1, 32 ]
                             }
                             output {
                               name: "O"
                               data_type: TYPE_FP16
                               dims: [ -1, -1, 32 ]
                             })pb"),
           "the one output must be Y");
  rejected(absl::StrCat(kMultiheadParams, R"pb(parameters {
                                                 key: "layer_norm_eps"
                                                 value { string_value: "-1" }
                                               })pb"),
           "layer_norm_eps=-1");
  rejected(absl::StrCat(kMultiheadParams, R"pb(parameters {
                                                 key: "dilation_rates"
                                                 value { string_value: "1,64" }
                                               })pb"),
           "dilation_rates");
}

// Mangled config.pbtxt text, seeded: each parse gives a model or an error with a reason, never a
// crash (this test also runs under ASan and UBSan).
TEST(ModelConfig, MangledConfigsAreParsedOrRejectedWithAReason) {
  const std::string valid = R"pb(
    name: "m"
    max_batch_size: 8
    input [ { name: "Q" data_type: TYPE_FP16 dims: [ -1, 4, 64 ] },
            { name: "K" data_type: TYPE_FP16 dims: [ -1, 4, 64 ] },
            { name: "V" data_type: TYPE_FP16 dims: [ -1, 4, 64 ] } ]
    dynamic_batching { preferred_batch_size: [4, 2] max_queue_delay_microseconds: 300
                       priority_levels: 3 default_queue_policy { max_queue_size: 7 } }
    parameters { key: "segment_lengths" value { string_value: "64,128" } }
    parameters { key: "dilation_rates" value { string_value: "1,2" } }
    parameters { key: "mode" value { string_value: "head_groups" } }
  )pb";
  const char* const kTokens[] = {"{", "}", "[", "]", ":", "\"", "-1", "0", "9223372036854775807",
                                 "99999999999999999999", "1e400", "nan", "TYPE_FP32", "name",
                                 "parameters", "dims", "max_batch_size", "\\", "\n", "#"};
  ASSERT_TRUE(ParseModelConfig(valid, "config.pbtxt", "").ok());
  uint64_t state = 12345;
  auto next = [&state](uint64_t bound) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (state >> 33) % bound;
  };
  int parsed = 0, rejected = 0;
  for (int round = 0; round < 20000; ++round) {
    std::string text = valid;
    for (uint64_t edits = 1 + next(4); edits > 0 && !text.empty(); --edits) {
      const size_t at = next(text.size());
      switch (next(4)) {
        case 0: text[at] = static_cast<char>(next(256)); break;
        case 1: text.erase(at, 1 + next(8)); break;
        case 2: text.insert(at, kTokens[next(std::size(kTokens))]); break;
        default: text.resize(at); break;
      }
    }
    absl::StatusOr<ModelSpec> spec = ParseModelConfig(text, "config.pbtxt", "");
    if (spec.ok()) {
      ++parsed;
    } else {
      ++rejected;
      EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << spec.status();
      EXPECT_FALSE(spec.status().message().empty());
    }
  }
  // Most edits break the text; some leave a valid model.
  EXPECT_GT(rejected, 10000);
  EXPECT_GT(parsed, 100);
}

TEST(OperatorOptions, ParameterForms) {
  OperatorOptions o;
  EXPECT_TRUE(ApplyOperatorParameter("segment_lengths", ParamValue(int64_t{512}), "p", &o).ok());
  EXPECT_EQ(o.dilated.segment_lengths, (std::vector<int64_t>{512}));
  EXPECT_TRUE(ApplyOperatorParameter("causal", ParamValue(std::string("TRUE")), "p", &o).ok());
  EXPECT_TRUE(o.dilated.causal);
  EXPECT_TRUE(ApplyOperatorParameter("softmax_scale", ParamValue(std::string("0.125")), "p", &o).ok());
  EXPECT_EQ(*o.dilated.softmax_scale, 0.125);
  EXPECT_TRUE(ApplyOperatorParameter("mode", ParamValue(std::string("head_groups")), "p", &o).ok());
  EXPECT_EQ(o.dilated.mode, attention::Mode::kHeadGroups);
  absl::Status s = ApplyOperatorParameter("mode", ParamValue(true), "request parameter", &o);
  EXPECT_THAT(std::string(s.message()), HasSubstr("request parameter 'mode'=true is not a string"));
  s = ApplyOperatorParameter("pattern", ParamValue(std::string("strided")), "p", &o);
  EXPECT_THAT(std::string(s.message()), HasSubstr("not known for dilated attention"));

  OperatorOptions sparse;
  sparse.kind = OperatorKind::kBlockSparse;
  EXPECT_TRUE(ApplyOperatorParameter("pairs", ParamValue(std::string("0:1, 2:3")), "p", &sparse).ok());
  EXPECT_EQ(sparse.sparse.pairs, (std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {2, 3}}));
  EXPECT_TRUE(ApplyOperatorParameter("seed", ParamValue(uint64_t{1} << 63), "p", &sparse).ok());
  EXPECT_EQ(sparse.sparse.seed, uint64_t{1} << 63);
  EXPECT_FALSE(ApplyOperatorParameter("density", ParamValue(std::string("lots")), "p", &sparse).ok());
}

TEST(OperatorOptions, KeysSeparateEveryDifference) {
  OperatorOptions a, b;
  a.dilated.segment_lengths = b.dilated.segment_lengths = {64};
  a.dilated.dilation_rates = b.dilated.dilation_rates = {1};
  EXPECT_EQ(OperatorKey(a), OperatorKey(b));
  a.dilated.softmax_scale = 0.1;
  b.dilated.softmax_scale = std::nextafter(0.1, 1.0);
  EXPECT_NE(OperatorKey(a), OperatorKey(b)) << "scales one ulp apart must not batch together";
  b = a;
  b.dilated.causal = true;
  EXPECT_NE(OperatorKey(a), OperatorKey(b));
}

}  // namespace
}  // namespace dilattn::server
