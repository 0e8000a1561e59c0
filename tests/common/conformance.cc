#include "tests/common/conformance.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {
namespace {

using google::protobuf::Struct;
using google::protobuf::Value;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<int64_t> IntList(const Value& v) {
  std::vector<int64_t> out;
  for (const Value& x : v.list_value().values()) out.push_back(static_cast<int64_t>(x.number_value()));
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
  Struct root;
  if (auto s = google::protobuf::util::JsonStringToMessage(*text, &root); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.ToString()));
  }
  std::vector<ConformanceCase> cases;
  for (const Value& item : root.fields().at("cases").list_value().values()) {
    const auto& f = item.struct_value().fields();
    ConformanceCase c;
    c.name = f.at("name").string_value();
    const std::vector<int64_t> shape = IntList(f.at("shape"));
    if (shape.size() != 4) return absl::InvalidArgumentError(c.name + ": shape needs 4 dims");
    c.batch = shape[0];
    c.seq_len = shape[1];
    c.heads = shape[2];
    c.head_dim = shape[3];
    c.options.segment_lengths = IntList(f.at("segment_lengths"));
    c.options.dilation_rates = IntList(f.at("dilation_rates"));
    absl::StatusOr<attention::Mode> mode = attention::ParseMode(f.at("mode").string_value());
    if (!mode.ok()) return mode.status();
    c.options.mode = *mode;
    c.options.causal = f.at("causal").bool_value();
    if (f.contains("softmax_scale")) c.options.softmax_scale = f.at("softmax_scale").number_value();
    c.seed = static_cast<uint64_t>(f.at("seed").number_value());
    c.input_scale = static_cast<float>(f.at("input_scale").number_value());
    if (f.contains("output_file")) c.output_file = f.at("output_file").string_value();
    if (f.contains("expect_error")) c.expect_error = f.at("expect_error").string_value();
    cases.push_back(std::move(c));
  }
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
