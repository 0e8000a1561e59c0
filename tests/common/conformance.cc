#include "tests/common/conformance.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "tests/common/json.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<int64_t> IntList(const Json& v) {
  std::vector<int64_t> out;
  for (const Json& x : v.array) out.push_back(static_cast<int64_t>(x.number));
  return out;
}

}  // namespace

std::string ConformanceDir() {
  const char* dir = std::getenv("DILATTN_CONFORMANCE_DIR");
  return dir != nullptr ? dir : DILATTN_DEFAULT_CONFORMANCE_DIR;
}

absl::StatusOr<std::vector<ConformanceCase>> LoadConformanceCases() {
  const std::string path = ConformanceDir() + "/cases.json";
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  absl::StatusOr<Json> root = JsonParser::Parse(*text);
  if (!root.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", root.status().message()));
  }
  std::vector<ConformanceCase> cases;
  for (const Json& f : (*root)["cases"].array) {
    ConformanceCase c;
    c.name = f["name"].string;
    const std::vector<int64_t> shape = IntList(f["shape"]);
    if (shape.size() != 4) return absl::InvalidArgumentError(c.name + ": shape needs 4 dims");
    c.batch = shape[0];
    c.seq_len = shape[1];
    c.heads = shape[2];
    c.head_dim = shape[3];
    c.options.segment_lengths = IntList(f["segment_lengths"]);
    c.options.dilation_rates = IntList(f["dilation_rates"]);
    absl::StatusOr<attention::Mode> mode = attention::ParseMode(f["mode"].string);
    if (!mode.ok()) return mode.status();
    c.options.mode = *mode;
    c.options.causal = f["causal"].boolean;
    if (f.Has("softmax_scale")) c.options.softmax_scale = f["softmax_scale"].number;
    c.seed = static_cast<uint64_t>(f["seed"].number);
    c.input_scale = static_cast<float>(f["input_scale"].number);
    c.output_file = f["output_file"].string;
    c.expect_error = f["expect_error"].string;
    cases.push_back(std::move(c));
  }
  if (cases.empty()) return absl::InvalidArgumentError(path + " lists no cases");
  return cases;
}

CaseInputs MakeCaseInputs(const ConformanceCase& c) {
  const size_t n = static_cast<size_t>(c.batch * c.seq_len * c.heads * c.head_dim);
  SplitMix64 rng(c.seed);
  CaseInputs in;
  for (std::vector<float>* t : {&in.q, &in.k, &in.v}) {
    t->resize(n);
    for (float& x : *t) x = rng.NextFloat(c.input_scale);
  }
  return in;
}

absl::StatusOr<std::vector<float>> LoadExpectedOutput(const ConformanceCase& c) {
  absl::StatusOr<std::string> raw = ReadFile(ConformanceDir() + "/" + c.output_file);
  if (!raw.ok()) return raw.status();
  const size_t n = static_cast<size_t>(c.batch * c.seq_len * c.heads * c.head_dim);
  if (raw->size() != n * sizeof(float)) {
    return absl::DataLossError(absl::StrCat(c.output_file, " holds ", raw->size(),
                                            " bytes, expected ", n * sizeof(float)));
  }
  std::vector<float> out(n);
  std::memcpy(out.data(), raw->data(), raw->size());  // little-endian hosts only, as the files
  return out;
}

}  // namespace dilattn::testing
