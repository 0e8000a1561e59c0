#include "server/model_config.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "kernels/common/small_file.h"

namespace dilattn::server {
namespace {

using inference::DataType;

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (first_.empty()) first_ = absl::StrCat("line ", line + 1, ", column ", column + 1, ": ", message);
  }
  void AddWarning(int, int, const std::string&) override {}
  const std::string& first() const { return first_; }

 private:
  std::string first_;
};

absl::StatusOr<attention::DType> FromConfigType(DataType t, absl::string_view what) {
  switch (t) {
    case inference::TYPE_FP32: return attention::DType::kFloat32;
    case inference::TYPE_FP16: return attention::DType::kFloat16;
    case inference::TYPE_BF16: return attention::DType::kBFloat16;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has data_type ", inference::DataType_Name(t),
          "; only TYPE_FP32, TYPE_FP16 and TYPE_BF16 are supported"));
  }
}

absl::Status CheckTensors(ModelSpec* spec, absl::string_view source) {
  inference::ModelConfig& c = spec->config;
  const bool batched = c.max_batch_size() > 0;
  const bool hidden = spec->hidden_states();
  // With a batch dimension the config lists [N, H, D] (or [N, E]).
  const int rank = (hidden ? 2 : 3) + (batched ? 0 : 1);
  const char* shape_text = hidden ? (batched ? " ([N, E])" : " ([B, N, E])")
                                  : (batched ? " ([N, H, D])" : " ([B, N, H, D])");
  const std::vector<std::string> in_names = spec->input_names();
  const std::string input_list = spec->InputList();
  const std::string output_name = spec->output_name();
  if (c.input_size() == 0) {
    for (const std::string& name : in_names) {
      inference::ModelInput* in = c.add_input();
      in->set_name(name);
      in->set_data_type(inference::TYPE_FP32);
      for (int i = 0; i < rank; ++i) in->add_dims(-1);
    }
  }
  if (c.output_size() == 0) {
    inference::ModelOutput* out = c.add_output();
    out->set_name(output_name);
    out->set_data_type(c.input(0).data_type());
    *out->mutable_dims() = c.input(0).dims();
  }
  std::set<std::string> names;
  for (const inference::ModelInput& in : c.input()) names.insert(in.name());
  if (c.input_size() != static_cast<int>(in_names.size()) ||
      names != std::set<std::string>(in_names.begin(), in_names.end())) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": inputs must be exactly ", input_list));
  }
  if (c.output_size() != 1 || c.output(0).name() != output_name) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": the one output must be ", output_name));
  }
  const DataType type = c.input(0).data_type();
  absl::StatusOr<attention::DType> dtype =
      FromConfigType(type, absl::StrCat("input ", c.input(0).name()));
  if (!dtype.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", dtype.status().message()));
  spec->declared_dtype = *dtype;
  for (const inference::ModelInput& in : c.input()) {
    if (in.data_type() != type) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": inputs ", input_list, " must share one data_type"));
    }
    if (in.dims_size() != rank) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": input ", in.name(), " has ", in.dims_size(), " dims; with max_batch_size ",
          c.max_batch_size(), " it needs ", rank, shape_text));
    }
    for (int i = 0; i < rank; ++i) {
      if (in.dims(i) == 0 || in.dims(i) < -1) {
        return absl::InvalidArgumentError(absl::StrCat(source, ": input ", in.name(), " dim ", i,
                                                       " is ", in.dims(i), " (want -1 or >= 1)"));
      }
      if (in.dims(i) != c.input(0).dims(i)) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": inputs ", input_list, " must declare the same dims"));
      }
    }
  }
  const int first = batched ? 0 : 1;
  if (!batched && c.input(0).dims(0) != -1) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": the batch dim B must be -1 (variable)"));
  }
  if (hidden) {
    const multihead::MultiheadWeights& w = *spec->defaults.weights;
    const int64_t e = c.input(0).dims(first + 1);
    if (e != -1 && e != w.embed_dim) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": input ", c.input(0).name(),
                                                     " declares E=", e,
                                                     " but the weights have E=", w.embed_dim));
    }
    spec->dims = {c.input(0).dims(first), w.num_heads, w.embed_dim / w.num_heads};
  } else {
    for (int i = 0; i < 3; ++i) spec->dims[static_cast<size_t>(i)] = c.input(0).dims(first + i);
  }
  if (c.output(0).data_type() != type) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": output ", output_name, " must have the inputs' data_type"));
  }
  // The output has the inputs' shape; the ModelConfig RPC reports it as declared.
  const auto& out_dims = c.output(0).dims();
  if (!std::equal(out_dims.begin(), out_dims.end(), c.input(0).dims().begin(),
                  c.input(0).dims().end())) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": output ", output_name, " declares dims [", absl::StrJoin(out_dims, ", "),
        "]; it must declare the inputs' [", absl::StrJoin(c.input(0).dims(), ", "), "]"));
  }
  return absl::OkStatus();
}

// The multihead module's own parameters (config only; a request cannot change the weights).
constexpr const char* kMultiheadModelParams[] = {"weights", "num_heads", "weights_prefix",
                                                 "layer_norm_eps"};

absl::Status LoadMultiheadWeights(ModelSpec* spec, absl::string_view source,
                                  absl::string_view model_dir) {
  const auto& params = spec->config.parameters();
  auto get = [&](const char* key) -> const std::string* {
    auto it = params.find(key);
    return it == params.end() ? nullptr : &it->second.string_value();
  };
  const std::string* path = get("weights");
  const std::string* heads = get("num_heads");
  if (path == nullptr || path->empty() || heads == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(source,
                     ": operator 'multihead_dilated_attention' needs parameters 'weights' (a "
                     "safetensors file) and 'num_heads'"));
  }
  multihead::WeightsOptions o;
  if (!absl::SimpleAtoi(*heads, &o.num_heads) || o.num_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": parameter num_heads='", *heads, "' is not an integer >= 1"));
  }
  if (const std::string* prefix = get("weights_prefix")) o.prefix = *prefix;
  if (const std::string* eps = get("layer_norm_eps")) {
    if (!absl::SimpleAtod(*eps, &o.layer_norm_eps)) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": parameter layer_norm_eps='", *eps, "' is not a number"));
    }
  }
  std::filesystem::path file(*path);
  if (file.is_relative() && !model_dir.empty()) {
    file = std::filesystem::path(std::string(model_dir)) / file;
  }
  absl::StatusOr<std::shared_ptr<const multihead::MultiheadWeights>> w =
      multihead::LoadWeightsFile(file.string(), o);
  if (!w.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", w.status().message()));
  spec->defaults.weights = *std::move(w);
  return absl::OkStatus();
}

// A config's microseconds (uint64 in the proto) as a duration; values past int64 would wrap to
// negative durations (no delay, no timeout), so they are refused.
absl::StatusOr<absl::Duration> Microseconds(uint64_t micros, absl::string_view field,
                                            absl::string_view source) {
  if (micros > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", field, " ", micros, " exceeds ",
                                                   std::numeric_limits<int64_t>::max()));
  }
  return absl::Microseconds(static_cast<int64_t>(micros));
}

absl::Status CheckBatching(ModelSpec* spec, absl::string_view source) {
  const inference::ModelConfig& c = spec->config;
  BatchingPolicy& b = spec->batching;
  if (c.max_batch_size() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": max_batch_size must be >= 0"));
  }
  b.max_batch_size = c.max_batch_size();
  if (!c.has_dynamic_batching()) return absl::OkStatus();
  const inference::ModelDynamicBatching& d = c.dynamic_batching();
  if (b.max_batch_size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": dynamic_batching needs max_batch_size > 0"));
  }
  b.dynamic = true;
  for (int p : d.preferred_batch_size()) {
    if (p < 1 || p > b.max_batch_size) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": preferred_batch_size ", p,
                                                     " is outside [1, max_batch_size=",
                                                     b.max_batch_size, "]"));
    }
    b.preferred_batch_sizes.push_back(p);
  }
  std::sort(b.preferred_batch_sizes.begin(), b.preferred_batch_sizes.end());
  absl::StatusOr<absl::Duration> delay =
      Microseconds(d.max_queue_delay_microseconds(), "max_queue_delay_microseconds", source);
  if (!delay.ok()) return delay.status();
  b.max_queue_delay = *delay;
  if (d.priority_levels() > 64) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": at most 64 priority_levels"));
  }
  b.priority_levels = d.priority_levels() == 0 ? 1 : static_cast<int>(d.priority_levels());
  // Compared before narrowing: a level of 2^32 + 1 must not pass as 1.
  if (d.default_priority_level() > static_cast<uint64_t>(b.priority_levels)) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": default_priority_level ",
                                                   d.default_priority_level(), " is outside [1, ",
                                                   b.priority_levels, "]"));
  }
  b.default_priority = d.default_priority_level() == 0
                           ? (b.priority_levels + 1) / 2
                           : static_cast<int>(d.default_priority_level());
  if (!d.priority_queue_policy().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": priority_queue_policy is not supported; use default_queue_policy"));
  }
  const inference::ModelQueuePolicy& q = d.default_queue_policy();
  if (q.timeout_action() != inference::ModelQueuePolicy::REJECT) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": timeout_action DELAY is not supported (expired requests are "
                             "rejected and never computed)"));
  }
  b.max_queue_size = q.max_queue_size();
  absl::StatusOr<absl::Duration> timeout =
      Microseconds(q.default_timeout_microseconds(), "default_timeout_microseconds", source);
  if (!timeout.ok()) return timeout.status();
  b.default_timeout = *timeout;
  b.allow_timeout_override = q.allow_timeout_override() || q.default_timeout_microseconds() == 0;
  return absl::OkStatus();
}

// Checks the operator defaults the same way requests are checked, on the smallest shape that
// satisfies them, so that a broken config fails at start-up rather than on every request.
absl::Status CheckOperator(const ModelSpec& spec, absl::string_view source) {
  const OperatorOptions& o = spec.defaults;
  // Dims the config fixes are planned as declared (a head_groups model with fewer heads than
  // branches fails here); the others take the smallest values the operator accepts.
  const int64_t n = spec.dims[0] > 0 ? spec.dims[0] : 1;
  const int64_t d = spec.dims[2] > 0 ? spec.dims[2] : 1;
  const int64_t branches =
      std::max<int64_t>(1, static_cast<int64_t>(o.dilated.segment_lengths.size()));
  const int64_t h = spec.dims[1] > 0 ? spec.dims[1] : branches;
  attention::ProblemShape shape = attention::DenseShape(attention::DType::kFloat32, 1, n, h, d);
  absl::Status s;
  if (o.kind == OperatorKind::kMultihead) {
    shape.num_heads = o.weights->num_heads;
    shape.head_dim = o.weights->embed_dim / o.weights->num_heads;
    s = multihead::PlanMultihead(o.weights, o.dilated, shape).status();
  } else if (o.kind == OperatorKind::kDilatedAttention) {
    s = attention::PlanAttention(o.dilated, shape).status();
  } else if (o.sparse.pattern == block_sparse::Pattern::kExplicit) {
    // Requests may bring the pairs; unless N is fixed, the options are checked with one pair
    // that any sequence has.
    block_sparse::BlockSparseOptions one = o.sparse;
    if (one.pairs.empty() || spec.dims[0] <= 0) one.pairs = {{0, 0}};
    s = block_sparse::PlanBlockSparse(one, shape).status();
  } else {
    s = block_sparse::PlanBlockSparse(o.sparse, shape).status();
  }
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", s.message()));
  return absl::OkStatus();
}

// What the built-in models share: FP32-declared tensors of any [N, H, D] (all three dtypes are
// accepted), batches of up to 64 sequences formed whenever the engine is busy.
constexpr const char* kBuiltInCommon = R"pb(
backend: "dilattn"
max_batch_size: 64
input { name: "Q" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }
input { name: "K" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }
input { name: "V" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }
output { name: "O" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }
dynamic_batching {
  max_queue_delay_microseconds: 0
  default_queue_policy { max_queue_size: 4096 }
}
)pb";

constexpr const char* kDilatedConfig = R"pb(
name: "dilated_attention"
parameters { key: "operator" value { string_value: "dilated_attention" } }
parameters { key: "mode" value { string_value: "longnet" } }
parameters { key: "segment_lengths" value { string_value: "2048,4096,8192,16384,32768" } }
parameters { key: "dilation_rates" value { string_value: "1,2,4,8,16" } }
parameters { key: "causal" value { string_value: "false" } }
)pb";

constexpr const char* kHeadGroupsConfig = R"pb(
name: "dilated_attention_head_groups"
parameters { key: "operator" value { string_value: "dilated_attention" } }
parameters { key: "mode" value { string_value: "head_groups" } }
parameters { key: "segment_lengths" value { string_value: "2048,4096,8192" } }
parameters { key: "dilation_rates" value { string_value: "1,2,4" } }
parameters { key: "causal" value { string_value: "false" } }
)pb";

constexpr const char* kBlockSparseConfig = R"pb(
name: "block_sparse_attention"
parameters { key: "operator" value { string_value: "block_sparse" } }
parameters { key: "block_size" value { string_value: "64" } }
parameters { key: "pattern" value { string_value: "local_window" } }
parameters { key: "window" value { string_value: "1" } }
parameters { key: "causal" value { string_value: "false" } }
)pb";

}  // namespace

absl::StatusOr<ModelSpec> ParseModelConfig(absl::string_view text, absl::string_view source,
                                           absl::string_view directory_name,
                                           absl::string_view model_dir) {
  ModelSpec spec;
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(text), &spec.config)) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", errors.first()));
  }
  inference::ModelConfig& c = spec.config;
  if (c.name().empty()) c.set_name(std::string(directory_name));
  if (c.name().empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": no model name"));
  if (!directory_name.empty() && c.name() != directory_name) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": name '", c.name(),
                                                   "' differs from its directory '",
                                                   directory_name, "'"));
  }
  if (!c.backend().empty() && c.backend() != "dilattn") {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": backend '", c.backend(), "' is not 'dilattn'"));
  }
  c.set_backend("dilattn");
  spec.name = c.name();

  auto op = c.parameters().find("operator");
  const std::string kind = op == c.parameters().end() ? "dilated_attention" : op->second.string_value();
  if (kind == "dilated_attention") {
    spec.defaults.kind = OperatorKind::kDilatedAttention;
  } else if (kind == "block_sparse") {
    spec.defaults.kind = OperatorKind::kBlockSparse;
  } else if (kind == "multihead_dilated_attention") {
    spec.defaults.kind = OperatorKind::kMultihead;
    if (absl::Status s = LoadMultiheadWeights(&spec, source, model_dir); !s.ok()) return s;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": parameter operator='", kind,
                     "' is not 'dilated_attention', 'block_sparse' or "
                     "'multihead_dilated_attention'"));
  }
  for (const auto& [key, value] : c.parameters()) {
    if (key == "operator") continue;
    if (spec.hidden_states() &&
        std::find(std::begin(kMultiheadModelParams), std::end(kMultiheadModelParams), key) !=
            std::end(kMultiheadModelParams)) {
      continue;
    }
    if (key == "max_batch_tokens") {
      if (!absl::SimpleAtoi(value.string_value(), &spec.batching.max_batch_tokens) ||
          spec.batching.max_batch_tokens < 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            source, ": parameter max_batch_tokens='", value.string_value(),
            "' is not an integer >= 1"));
      }
      continue;
    }
    absl::Status s = ApplyOperatorParameter(key, ParamValue(value.string_value()),
                                            absl::StrCat(source, ": config parameter"),
                                            &spec.defaults);
    if (!s.ok()) return s;
  }
  if (absl::Status s = CheckTensors(&spec, source); !s.ok()) return s;
  if (absl::Status s = CheckBatching(&spec, source); !s.ok()) return s;
  if (absl::Status s = CheckOperator(spec, source); !s.ok()) return s;
  return spec;
}

std::string IgnoredConfigFieldsWarning(const inference::ModelConfig& config) {
  std::vector<std::string> fields;
  if (!config.platform().empty()) {
    fields.push_back(
        absl::StrCat("platform \"", config.platform(), "\" (dilattn runs every model itself)"));
  }
  int64_t instances = 0;
  std::vector<int32_t> gpus;
  bool cpu_kind = false;
  for (const inference::ModelInstanceGroup& g : config.instance_group()) {
    instances += std::max(g.count(), 1);  // Triton reads a count of 0 as 1
    gpus.insert(gpus.end(), g.gpus().begin(), g.gpus().end());
    cpu_kind |= g.kind() == inference::ModelInstanceGroup::KIND_CPU;
  }
  // Triton runs a model's instances side by side, where the groups say; here one engine serves
  // every model on the devices --device names.
  std::vector<std::string> placement;
  if (instances > 1) placement.push_back(absl::StrCat(instances, " instances"));
  if (!gpus.empty()) placement.push_back(absl::StrCat("gpus [", absl::StrJoin(gpus, ", "), "]"));
  if (cpu_kind) placement.push_back("kind KIND_CPU");
  if (!placement.empty()) {
    fields.push_back(absl::StrCat("instance_group ", absl::StrJoin(placement, ", "),
                                  " (one engine on the --device devices runs every model)"));
  }
  if (config.dynamic_batching().preserve_ordering()) {
    fields.push_back(
        "dynamic_batching.preserve_ordering: true (responses come as their batches finish)");
  }
  for (const inference::ModelInput& in : config.input()) {
    if (in.optional()) {
      fields.push_back(
          absl::StrCat("input ", in.name(), " optional: true (a request without it is refused)"));
    }
  }
  if (fields.empty()) return "";
  return absl::StrCat("model '", config.name(),
                      "': config fields ignored: ", absl::StrJoin(fields, "; "));
}

absl::StatusOr<std::vector<ModelSpec>> LoadModelRepository(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("model repository '", dir, "' is not a directory"));
  }
  std::vector<fs::path> model_dirs;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    if (e.is_directory() && fs::exists(e.path() / "config.pbtxt")) model_dirs.push_back(e.path());
  }
  std::sort(model_dirs.begin(), model_dirs.end());
  if (model_dirs.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model repository '", dir, "' holds no <model>/config.pbtxt"));
  }
  std::vector<ModelSpec> specs;
  for (const fs::path& p : model_dirs) {
    const fs::path file = p / "config.pbtxt";
    // A config is text of a few KiB (Triton's largest, ensembles of many steps, are tens of
    // KiB), a small file's cap at most; anything else (a directory, a FIFO, /dev/zero behind a
    // link) would hang the start-up or exhaust memory rather than fail to parse.
    if (!fs::is_regular_file(file, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(file.string(), " is not a regular file"));
    }
    if (const uintmax_t size = fs::file_size(file, ec); ec || size > kMaxSmallFileBytes) {
      return absl::InvalidArgumentError(
          ec ? absl::StrCat(file.string(), " cannot be read: ", ec.message())
             : absl::StrCat(file.string(), " holds ", size, " bytes, more than a model config's ",
                            kMaxSmallFileBytes >> 20, " MiB"));
    }
    std::ifstream in(file);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) {
      return absl::InvalidArgumentError(absl::StrCat(file.string(), " cannot be read"));
    }
    absl::StatusOr<ModelSpec> spec =
        ParseModelConfig(text.str(), file.string(), p.filename().string(), p.string());
    if (!spec.ok()) return spec.status();
    specs.push_back(*std::move(spec));
  }
  return specs;
}

std::vector<ModelSpec> DefaultModels() {
  std::vector<ModelSpec> specs;
  for (const char* text : {kDilatedConfig, kHeadGroupsConfig, kBlockSparseConfig}) {
    absl::StatusOr<ModelSpec> spec =
        ParseModelConfig(absl::StrCat(kBuiltInCommon, text), "built-in config", "");
    // The built-in configs are tested; a failure here is a programming error caught by tests.
    if (spec.ok()) specs.push_back(*std::move(spec));
  }
  return specs;
}

}  // namespace dilattn::server
