#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/attention/attention.h"
#include "kernels/common/quote.h"

namespace dilattn::attention {
namespace {

bool MulOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }
bool AddOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_add_overflow(a, b, out); }

absl::Status CheckBranches(const AttentionOptions& options) {
  const auto& w = options.segment_lengths;
  const auto& r = options.dilation_rates;
  if (w.empty() || r.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "segment_lengths and dilation_rates must be non-empty, got ", w.size(), " and ", r.size(),
        " entries"));
  }
  if (w.size() != r.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("segment_lengths has ", w.size(), " entries but dilation_rates has ",
                     r.size(), "; they need one entry per branch"));
  }
  if (w.size() > static_cast<size_t>(kMaxBranches)) {
    return absl::InvalidArgumentError(absl::StrCat("at most ", kMaxBranches,
                                                   " branches are supported, got ", w.size()));
  }
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("segment_lengths[", i, "]=", w[i], " must be >= 1"));
    }
    if (r[i] < 1 || r[i] > w[i]) {
      return absl::InvalidArgumentError(absl::StrCat("dilation_rates[", i, "]=", r[i],
                                                     " must satisfy 1 <= r <= segment_lengths[",
                                                     i, "]=", w[i]));
    }
  }
  return absl::OkStatus();
}

}  // namespace

ProblemShape DenseShape(DType dtype, int64_t batch, int64_t seq_len, int64_t num_heads,
                        int64_t head_dim) {
  ProblemShape shape;
  shape.dtype = dtype;
  shape.num_heads = num_heads;
  shape.head_dim = head_dim;
  if (batch > 0) shape.seq_lengths.assign(static_cast<size_t>(batch), seq_len);
  return shape;
}

std::string DescribeShape(const ProblemShape& shape) {
  const auto& lengths = shape.seq_lengths;
  const bool dense = !lengths.empty() && std::all_of(lengths.begin(), lengths.end(),
                                                     [&](int64_t n) { return n == lengths[0]; });
  std::string seqs = dense ? absl::StrCat("B=", lengths.size(), ", N=", lengths[0])
                           : absl::StrCat("sequences=", lengths.size(), " (lengths ",
                                          absl::StrJoin(lengths.begin(),
                                                        lengths.begin() +
                                                            std::min<size_t>(lengths.size(), 8),
                                                        ","),
                                          lengths.size() > 8 ? ",..." : "", ")");
  return absl::StrCat(seqs, ", H=", shape.num_heads, ", D=", shape.head_dim, ", ",
                      DTypeName(shape.dtype));
}

absl::StatusOr<Mode> ParseMode(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "longnet") return Mode::kLongNet;
  if (lower == "head_groups") return Mode::kHeadGroups;
  return absl::InvalidArgumentError(
      absl::StrCat("mode ", Quote(name), " is not one of 'longnet', 'head_groups'"));
}

absl::string_view ModeName(Mode mode) {
  return mode == Mode::kLongNet ? "longnet" : "head_groups";
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "fp32" || lower == "float32" || lower == "type_fp32") return DType::kFloat32;
  if (lower == "fp16" || lower == "float16" || lower == "type_fp16") return DType::kFloat16;
  if (lower == "bf16" || lower == "bfloat16" || lower == "type_bf16") return DType::kBFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("datatype ", Quote(name), " is not one of FP32, FP16, BF16"));
}

double BranchFlops(int64_t seq_len, int64_t segment_length, int64_t dilation_rate,
                   int64_t head_dim, bool causal) {
  const double n = static_cast<double>(seq_len);
  const double w = static_cast<double>(std::min(segment_length, seq_len));
  const double r = static_cast<double>(dilation_rate);
  const double flops = 4.0 * n * w * static_cast<double>(head_dim) / (r * r);
  return causal ? flops / 2 : flops;
}

absl::Status CheckSoftmaxScale(const std::optional<double>& scale) {
  if (!scale.has_value()) return absl::OkStatus();
  if (!(std::isfinite(*scale) && *scale > 0 && static_cast<float>(*scale) > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("softmax_scale must be finite and > 0, got ", *scale));
  }
  if (*scale > kMaxSoftmaxScale) {
    return absl::InvalidArgumentError(absl::StrCat(
        "softmax_scale ", *scale, " exceeds ", kMaxSoftmaxScale, " (scores would overflow fp32)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<AttentionPlan> PlanAttention(const AttentionOptions& options,
                                            const ProblemShape& shape) {
  if (absl::Status s = CheckBranches(options); !s.ok()) return s;
  const int64_t num_branches = static_cast<int64_t>(options.segment_lengths.size());
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  if (shape.num_heads < 1 || shape.num_heads > kInt32Max) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_heads (H) must be in [1, ", kInt32Max, "], got ", shape.num_heads));
  }
  if (shape.head_dim < 1 || shape.head_dim > kInt32Max) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim (D) must be in [1, ", kInt32Max, "], got ", shape.head_dim));
  }
  if (shape.seq_lengths.empty()) {
    return absl::InvalidArgumentError("batch size (B) must be >= 1, got 0 sequences");
  }
  if (options.mode == Mode::kHeadGroups && shape.num_heads < num_branches) {
    return absl::InvalidArgumentError(
        absl::StrCat("mode=head_groups needs num_heads >= number of branches, got num_heads=",
                     shape.num_heads, " for ", num_branches, " branches"));
  }
  if (absl::Status s = CheckSoftmaxScale(options.softmax_scale); !s.ok()) return s;

  AttentionPlan plan;
  plan.options = options;
  plan.shape = shape;
  plan.seq_offsets.reserve(shape.seq_lengths.size() + 1);
  plan.seq_offsets.push_back(0);
  int64_t total = 0;
  int64_t max_len = 0;
  for (size_t s = 0; s < shape.seq_lengths.size(); ++s) {
    const int64_t n = shape.seq_lengths[s];
    if (n < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence length (N) must be >= 1, got ", n, " for sequence ", s));
    }
    if (AddOverflows(total, n, &total)) {
      return absl::InvalidArgumentError("total token count overflows int64");
    }
    max_len = std::max(max_len, n);
    plan.seq_offsets.push_back(total);
  }
  int64_t elements = 0;
  int64_t bytes = 0;
  if (MulOverflows(total, shape.num_heads, &elements) ||
      MulOverflows(elements, shape.head_dim, &elements) ||
      MulOverflows(elements, static_cast<int64_t>(DTypeSize(shape.dtype)), &bytes) ||
      static_cast<uint64_t>(bytes) > std::numeric_limits<size_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor size overflows: ", total, " tokens x ",
                                                   shape.num_heads, " heads x ", shape.head_dim,
                                                   " x ", DTypeSize(shape.dtype), " bytes"));
  }
  plan.tensor_bytes = static_cast<size_t>(bytes);

  DilatedAttentionParams& p = plan.params;
  const int64_t row = shape.num_heads * shape.head_dim;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = row;
  p.num_seqs = static_cast<int64_t>(shape.seq_lengths.size());
  p.total_tokens = total;
  p.max_seq_len = max_len;
  p.num_heads = static_cast<int32_t>(shape.num_heads);
  p.head_dim = static_cast<int32_t>(shape.head_dim);
  p.dtype = shape.dtype;
  p.mode = options.mode;
  p.causal = options.causal;
  p.scale = static_cast<float>(options.softmax_scale.value_or(
      1.0 / std::sqrt(static_cast<double>(shape.head_dim))));
  if (!(std::isfinite(p.scale) && p.scale > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("softmax_scale ", *options.softmax_scale,
                                                   " is not representable as a positive fp32"));
  }
  p.num_branches = static_cast<int32_t>(num_branches);
  const int64_t heads = shape.num_heads;
  int64_t begin = 0;
  for (int64_t i = 0; i < num_branches; ++i) {
    const int64_t r = options.dilation_rates[i];
    p.segment_length[i] = options.segment_lengths[i];
    p.dilation_rate[i] = r;
    // ceil(H / r) without forming H + r - 1: rates go up to the largest int64 segment length.
    p.offset_divisor[i] = static_cast<int32_t>(heads / r + (heads % r != 0 ? 1 : 0));
    // Groups of H / G heads, the first H % G one larger, ranges by cumulative sum (defect 3).
    p.group_head_begin[i] = static_cast<int32_t>(begin);
    begin += heads / num_branches + (i < heads % num_branches ? 1 : 0);
  }
  p.group_head_begin[num_branches] = static_cast<int32_t>(begin);

  for (int64_t n : shape.seq_lengths) {
    for (int64_t i = 0; i < num_branches; ++i) {
      const int64_t branch_heads = options.mode == Mode::kLongNet
                                       ? heads
                                       : p.group_head_begin[i + 1] - p.group_head_begin[i];
      plan.flops += static_cast<double>(branch_heads) *
                    BranchFlops(n, p.segment_length[i], p.dilation_rate[i], shape.head_dim,
                                options.causal);
    }
  }
  return plan;
}

int64_t SegmentCutUnit(const DilatedAttentionParams& params, int64_t limit) {
  int64_t unit = 1;
  for (int i = 0; i < params.num_branches; ++i) {
    const int64_t w = params.segment_length[i];
    const int64_t step = w / std::gcd(unit, w);
    if (unit > limit / step) return 0;
    unit *= step;
  }
  return unit;
}

std::vector<PlanPiece> SplitIntoPieces(const AttentionPlan& plan, int64_t target_rows) {
  const int64_t total = plan.params.total_tokens;
  std::vector<PlanPiece> pieces;
  if (target_rows < 1 || total <= target_rows) {
    pieces.push_back(PlanPiece{0, total, plan.shape});
    return pieces;
  }
  // Cuts lie at multiples of every segment length; where their lcm exceeds the target,
  // sequences stay whole and are only grouped.
  int64_t length = std::numeric_limits<int64_t>::max();  // a long sequence's pieces
  if (const int64_t unit = SegmentCutUnit(plan.params, target_rows); unit > 0) {
    length = target_rows / unit * unit;
  }
  PlanPiece piece{0, 0, plan.shape};
  piece.shape.seq_lengths.clear();
  auto close = [&] {
    if (piece.row_end > piece.row_begin) pieces.push_back(piece);
    piece.row_begin = piece.row_end;
    piece.shape.seq_lengths.clear();
  };
  for (int64_t n : plan.shape.seq_lengths) {
    for (int64_t at = 0; at < n; at += length) {
      const int64_t rows = std::min(length, n - at);
      if (piece.row_end - piece.row_begin > target_rows - rows) close();
      piece.shape.seq_lengths.push_back(rows);
      piece.row_end += rows;
    }
  }
  close();
  return pieces;
}

absl::Status CheckTensors(const AttentionPlan& plan, const AttentionTensors& t, DeviceLoc where) {
  struct Named {
    const char* name;
    const void* data;
    size_t bytes;
    DeviceLoc location;
  };
  const Named all[] = {{"Q", t.q.data, t.q.bytes, t.q.location},
                       {"K", t.k.data, t.k.bytes, t.k.location},
                       {"V", t.v.data, t.v.bytes, t.v.location},
                       {"O", t.o.data, t.o.bytes, t.o.location}};
  for (const Named& n : all) {
    if (n.bytes != plan.tensor_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(n.name, " holds ", n.bytes, " bytes but shape (",
                       DescribeShape(plan.shape), ") needs ", plan.tensor_bytes));
    }
    if (n.data == nullptr) return absl::InvalidArgumentError(absl::StrCat(n.name, " is null"));
    if (!(n.location == where)) {
      return absl::InvalidArgumentError(absl::StrCat(n.name, " lives on ", n.location.ToString(),
                                                     " but the backend runs on ",
                                                     where.ToString()));
    }
    const size_t element = DTypeSize(plan.shape.dtype);
    if (reinterpret_cast<uintptr_t>(n.data) % element != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          n.name, " at address ", absl::Hex(reinterpret_cast<uintptr_t>(n.data), absl::kZeroPad16),
          " is not aligned to its ", element, "-byte elements"));
    }
  }
  // The output is written while the inputs are read; inputs may share memory (K = V).
  const auto* o = static_cast<const std::byte*>(t.o.data);
  for (int i = 0; i < 3; ++i) {
    const auto* in = static_cast<const std::byte*>(all[i].data);
    if (in < o + t.o.bytes && o < in + all[i].bytes) {
      return absl::InvalidArgumentError(absl::StrCat("O overlaps ", all[i].name));
    }
  }
  return absl::OkStatus();
}

}  // namespace dilattn::attention
