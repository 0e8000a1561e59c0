#include "kernels/attention/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dilattn::attention {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Offset of the positions head h keeps in branch i, or -1 when h does not take part in it.
int64_t HeadOffset(const DilatedAttentionParams& p, int branch, int head) {
  if (p.mode == Mode::kLongNet) return head / p.offset_divisor[branch];
  if (head < p.group_head_begin[branch] || head >= p.group_head_begin[branch + 1]) return -1;
  return branch % p.dilation_rate[branch];
}

}  // namespace

absl::Status ReferenceAttention(const AttentionPlan& plan, const AttentionTensors& tensors) {
  if (absl::Status s = CheckTensors(plan, tensors, DeviceLoc::Host()); !s.ok()) return s;
  const DilatedAttentionParams& p = plan.params;
  const int64_t heads = p.num_heads;
  const int64_t dim = p.head_dim;
  const DType dt = p.dtype;
  auto at = [&](int64_t token, int64_t head, int64_t d) {
    return static_cast<size_t>((token * heads + head) * dim + d);
  };

  std::vector<double> lse;      // [N]: log of the branch's softmax denominator at each query
  std::vector<double> out;      // [N, D]: the branch's normalised output
  std::vector<double> lse_all;  // [N]: log-sum over branches so far
  std::vector<double> mixed;    // [N, D]
  std::vector<double> scores;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t base = plan.seq_offsets[s];
    const int64_t n = plan.seq_offsets[s + 1] - base;
    for (int64_t h = 0; h < heads; ++h) {
      lse_all.assign(n, kNegInf);
      mixed.assign(n * dim, 0.0);
      for (int b = 0; b < p.num_branches; ++b) {
        const int64_t offset = HeadOffset(p, b, static_cast<int>(h));
        if (offset < 0) continue;
        const int64_t w = std::min(p.segment_length[b], n);
        const int64_t r = p.dilation_rate[b];
        lse.assign(n, kNegInf);
        out.assign(n * dim, 0.0);
        for (int64_t start = 0; start < n; start += w) {
          const int64_t end = std::min(start + w, n);
          // The next kept position, or end: rates go up to the largest int64 segment length.
          auto next = [&](int64_t x) { return r < end - x ? x + r : end; };
          for (int64_t qp = start + offset; qp < end; qp = next(qp)) {
            scores.clear();
            double max_score = kNegInf;
            for (int64_t kp = start + offset; kp < end; kp = next(kp)) {
              if (p.causal && kp > qp) break;
              double dot = 0;
              for (int64_t d = 0; d < dim; ++d) {
                dot += static_cast<double>(LoadAsFloat(tensors.q.data, dt, at(base + qp, h, d))) *
                       static_cast<double>(LoadAsFloat(tensors.k.data, dt, at(base + kp, h, d)));
              }
              scores.push_back(dot * p.scale);
              max_score = std::max(max_score, scores.back());
            }
            double denom = 0;
            for (double& x : scores) denom += (x = std::exp(x - max_score));
            for (size_t j = 0; j < scores.size(); ++j) {
              const int64_t kp = start + offset + static_cast<int64_t>(j) * r;
              for (int64_t d = 0; d < dim; ++d) {
                out[qp * dim + d] +=
                    scores[j] / denom *
                    static_cast<double>(LoadAsFloat(tensors.v.data, dt, at(base + kp, h, d)));
              }
            }
            lse[qp] = max_score + std::log(denom);
          }
        }
        // Fold this branch in: weights exp(lse_b - lse_total) are the denominator shares.
        for (int64_t qp = 0; qp < n; ++qp) {
          if (lse[qp] == kNegInf) continue;
          const double total = lse_all[qp] == kNegInf
                                   ? lse[qp]
                                   : std::max(lse_all[qp], lse[qp]) +
                                         std::log1p(std::exp(-std::abs(lse_all[qp] - lse[qp])));
          const double keep = lse_all[qp] == kNegInf ? 0.0 : std::exp(lse_all[qp] - total);
          const double add = std::exp(lse[qp] - total);
          for (int64_t d = 0; d < dim; ++d) {
            mixed[qp * dim + d] = mixed[qp * dim + d] * keep + out[qp * dim + d] * add;
          }
          lse_all[qp] = total;
        }
      }
      for (int64_t qp = 0; qp < n; ++qp) {
        for (int64_t d = 0; d < dim; ++d) {
          StoreFromFloat(tensors.o.data, dt, at(base + qp, h, d),
                         static_cast<float>(mixed[qp * dim + d]));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace dilattn::attention
