#include "server/operator_options.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kernels/common/quote.h"

namespace dilattn::server {
namespace {

absl::Status Bad(absl::string_view where, absl::string_view name, const ParamValue& value,
                 absl::string_view expected) {
  return absl::InvalidArgumentError(
      absl::StrCat(where, " ", Quote(name), "=", ParamValueToString(value), " is not ", expected));
}

absl::StatusOr<int64_t> AsInt64(const ParamValue& v) {
  if (const int64_t* i = std::get_if<int64_t>(&v)) return *i;
  if (const uint64_t* u = std::get_if<uint64_t>(&v)) {
    if (*u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(*u);
    }
  }
  if (const std::string* s = std::get_if<std::string>(&v)) {
    int64_t out;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(*s), &out)) return out;
  }
  return absl::InvalidArgumentError("");
}

absl::StatusOr<uint64_t> AsUint64(const ParamValue& v) {
  if (const uint64_t* u = std::get_if<uint64_t>(&v)) return *u;
  if (const int64_t* i = std::get_if<int64_t>(&v); i != nullptr && *i >= 0) {
    return static_cast<uint64_t>(*i);
  }
  if (const std::string* s = std::get_if<std::string>(&v)) {
    uint64_t out;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(*s), &out)) return out;
  }
  return absl::InvalidArgumentError("");
}

absl::StatusOr<double> AsDouble(const ParamValue& v) {
  if (const double* d = std::get_if<double>(&v)) return *d;
  if (const int64_t* i = std::get_if<int64_t>(&v)) return static_cast<double>(*i);
  if (const uint64_t* u = std::get_if<uint64_t>(&v)) return static_cast<double>(*u);
  if (const std::string* s = std::get_if<std::string>(&v)) {
    double out;
    if (absl::SimpleAtod(absl::StripAsciiWhitespace(*s), &out)) return out;
  }
  return absl::InvalidArgumentError("");
}

absl::StatusOr<bool> AsBool(const ParamValue& v) {
  if (const bool* b = std::get_if<bool>(&v)) return *b;
  if (const int64_t* i = std::get_if<int64_t>(&v); i != nullptr && (*i == 0 || *i == 1)) {
    return *i == 1;
  }
  if (const uint64_t* u = std::get_if<uint64_t>(&v); u != nullptr && (*u == 0 || *u == 1)) {
    return *u == 1;
  }
  if (const std::string* s = std::get_if<std::string>(&v)) {
    const std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(*s));
    if (lower == "true" || lower == "1") return true;
    if (lower == "false" || lower == "0") return false;
  }
  return absl::InvalidArgumentError("");
}

absl::StatusOr<std::string> AsString(const ParamValue& v) {
  if (const std::string* s = std::get_if<std::string>(&v)) return *s;
  return absl::InvalidArgumentError("");
}

// "2048,4096" (an int64 parameter counts as a list of one).
absl::StatusOr<std::vector<int64_t>> AsInt64List(const ParamValue& v) {
  if (std::holds_alternative<int64_t>(v) || std::holds_alternative<uint64_t>(v)) {
    absl::StatusOr<int64_t> one = AsInt64(v);
    if (!one.ok()) return one.status();
    return std::vector<int64_t>{*one};
  }
  const std::string* s = std::get_if<std::string>(&v);
  if (s == nullptr) return absl::InvalidArgumentError("");
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(*s, ',')) {
    int64_t x;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &x)) {
      return absl::InvalidArgumentError("");
    }
    out.push_back(x);
  }
  return out;
}

// "0:1,1:0"
absl::StatusOr<std::vector<std::pair<int64_t, int64_t>>> AsPairs(const ParamValue& v) {
  const std::string* s = std::get_if<std::string>(&v);
  if (s == nullptr) return absl::InvalidArgumentError("");
  std::vector<std::pair<int64_t, int64_t>> out;
  for (absl::string_view part : absl::StrSplit(*s, ',')) {
    const std::vector<absl::string_view> ij = absl::StrSplit(part, ':');
    int64_t i, j;
    if (ij.size() != 2 || !absl::SimpleAtoi(absl::StripAsciiWhitespace(ij[0]), &i) ||
        !absl::SimpleAtoi(absl::StripAsciiWhitespace(ij[1]), &j)) {
      return absl::InvalidArgumentError("");
    }
    out.emplace_back(i, j);
  }
  return out;
}

// Round-trip exact, unlike StrCat's six digits: two scales differing in the last bit must not
// batch together.
std::string Exact(double x) { return absl::StrFormat("%.17g", x); }

constexpr absl::string_view kDilatedNames[] = {"segment_lengths", "dilation_rates", "mode",
                                               "causal", "softmax_scale"};
constexpr absl::string_view kSparseNames[] = {"block_size", "pattern", "window", "rates",
                                              "global_blocks", "stride", "density", "seed",
                                              "pairs", "causal", "softmax_scale"};

}  // namespace

std::string ParamValueToString(const ParamValue& value) {
  return std::visit(
      [](const auto& v) -> std::string {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, bool>) {
          return v ? "true" : "false";
        } else if constexpr (std::is_same_v<T, std::string>) {
          return Quote(v);
        } else {
          return absl::StrCat(v);
        }
      },
      value);
}

bool IsOperatorParameter(OperatorKind kind, absl::string_view name) {
  if (UsesDilatedOptions(kind)) {
    for (absl::string_view n : kDilatedNames) {
      if (n == name) return true;
    }
    return false;
  }
  for (absl::string_view n : kSparseNames) {
    if (n == name) return true;
  }
  return false;
}

absl::Status ApplyOperatorParameter(absl::string_view name, const ParamValue& value,
                                    absl::string_view where, OperatorOptions* o) {
  auto bad = [&](absl::string_view expected) { return Bad(where, name, value, expected); };
  if (!IsOperatorParameter(o->kind, name)) {
    const char* what = o->kind == OperatorKind::kDilatedAttention ? "dilated attention"
                       : o->kind == OperatorKind::kMultihead      ? "multihead dilated attention"
                                                                  : "block-sparse attention";
    return absl::InvalidArgumentError(
        absl::StrCat(where, " ", Quote(name), " is not known for ", what, " (known: ",
                     UsesDilatedOptions(o->kind) ? absl::StrJoin(kDilatedNames, ", ")
                                                 : absl::StrJoin(kSparseNames, ", "),
                     ")"));
  }
  if (name == "causal") {
    absl::StatusOr<bool> b = AsBool(value);
    if (!b.ok()) return bad("a bool");
    o->dilated.causal = o->sparse.causal = *b;
    return absl::OkStatus();
  }
  if (name == "softmax_scale") {
    absl::StatusOr<double> d = AsDouble(value);
    if (!d.ok()) return bad("a number");
    o->dilated.softmax_scale = o->sparse.softmax_scale = *d;
    return absl::OkStatus();
  }
  if (UsesDilatedOptions(o->kind)) {
    if (name == "segment_lengths" || name == "dilation_rates") {
      absl::StatusOr<std::vector<int64_t>> list = AsInt64List(value);
      if (!list.ok()) return bad("a comma-separated list of integers such as \"2048,4096\"");
      (name == "segment_lengths" ? o->dilated.segment_lengths : o->dilated.dilation_rates) =
          *std::move(list);
      return absl::OkStatus();
    }
    absl::StatusOr<std::string> s = AsString(value);  // mode
    if (!s.ok()) return bad("a string ('longnet' or 'head_groups')");
    absl::StatusOr<attention::Mode> mode = attention::ParseMode(*s);
    if (!mode.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", mode.status().message()));
    o->dilated.mode = *mode;
    return absl::OkStatus();
  }
  block_sparse::BlockSparseOptions& sp = o->sparse;
  if (name == "pattern") {
    absl::StatusOr<std::string> s = AsString(value);
    if (!s.ok()) return bad("a pattern name");
    absl::StatusOr<block_sparse::Pattern> p = block_sparse::ParsePattern(*s);
    if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", p.status().message()));
    sp.pattern = *p;
  } else if (name == "rates") {
    absl::StatusOr<std::vector<int64_t>> list = AsInt64List(value);
    if (!list.ok()) return bad("a comma-separated list of integers");
    sp.rates = *std::move(list);
  } else if (name == "pairs") {
    absl::StatusOr<std::vector<std::pair<int64_t, int64_t>>> pairs = AsPairs(value);
    if (!pairs.ok()) return bad("a list of block pairs such as \"0:1,1:0\"");
    sp.pairs = *std::move(pairs);
  } else if (name == "density") {
    absl::StatusOr<double> d = AsDouble(value);
    if (!d.ok()) return bad("a number");
    sp.density = *d;
  } else if (name == "seed") {
    absl::StatusOr<uint64_t> u = AsUint64(value);
    if (!u.ok()) return bad("an unsigned integer");
    sp.seed = *u;
  } else {
    absl::StatusOr<int64_t> i = AsInt64(value);
    if (!i.ok()) return bad("an integer");
    if (name == "block_size") sp.block_size = *i;
    if (name == "window") sp.window = *i;
    if (name == "global_blocks") sp.global_blocks = *i;
    if (name == "stride") sp.stride = *i;
  }
  return absl::OkStatus();
}

std::string OperatorKey(const OperatorOptions& o) {
  if (UsesDilatedOptions(o.kind)) {
    const attention::AttentionOptions& d = o.dilated;
    const std::string kind =
        o.kind == OperatorKind::kMultihead
            ? absl::StrCat("multihead:", o.weights == nullptr ? 0 : o.weights->id)
            : "dilated";
    return absl::StrCat(kind, "|", attention::ModeName(d.mode), "|",
                        absl::StrJoin(d.segment_lengths, ","), "|",
                        absl::StrJoin(d.dilation_rates, ","), "|", d.causal, "|",
                        d.softmax_scale ? Exact(*d.softmax_scale) : "default");
  }
  const block_sparse::BlockSparseOptions& s = o.sparse;
  std::string pairs;
  for (const auto& [i, j] : s.pairs) absl::StrAppend(&pairs, i, ":", j, ",");
  return absl::StrCat("sparse|", block_sparse::PatternName(s.pattern), "|", s.block_size, "|",
                      s.window, "|", absl::StrJoin(s.rates, ","), "|", s.global_blocks, "|",
                      s.stride, "|", Exact(s.density), "|", s.seed, "|", pairs, "|", s.causal, "|",
                      s.softmax_scale ? Exact(*s.softmax_scale) : "default");
}

}  // namespace dilattn::server
