#pragma once

// Random operator configurations and a deliberately naive float64 implementation that knows
// nothing of segments or tiles: it builds, for each query, the multiset of keys all branches give
// it (an explicit count matrix) and takes one softmax over it.

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/attention/attention.h"
#include "kernels/block_sparse/block_sparse.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {

// Seed for this run: DILATTN_TEST_SEED if set (to replay a failure), else the clock.
inline uint64_t TestSeed() {
  if (const char* s = std::getenv("DILATTN_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
}

// A random block-sparse pattern with its parameters, causal or not, sometimes a custom scale;
// the caller picks the block size. Explicit pairs name blocks 0..2.
inline void DrawBlockSparsePattern(SplitMix64& rng, block_sparse::BlockSparseOptions* o) {
  o->pattern = static_cast<block_sparse::Pattern>(rng.Uniform(0, 5));
  o->causal = rng.Uniform(0, 1) == 1;
  o->window = rng.Uniform(0, 3);
  o->global_blocks = rng.Uniform(0, 2);
  o->stride = rng.Uniform(1, 4);
  o->density = 0.1 * static_cast<double>(rng.Uniform(0, 10));
  o->seed = rng.Next();
  for (int64_t i = rng.Uniform(1, 3); i > 0; --i) o->rates.push_back(rng.Uniform(1, 5));
  for (int64_t i = rng.Uniform(1, 6); i > 0; --i) {
    o->pairs.emplace_back(rng.Uniform(0, 2), rng.Uniform(0, 2));
  }
  if (rng.Uniform(0, 3) == 0) o->softmax_scale = 0.1 + 0.01 * static_cast<double>(rng.Uniform(0, 50));
}

struct RandomCase {
  attention::AttentionOptions options;
  attention::ProblemShape shape;
  float input_scale = 1;

  std::string Describe() const {
    return absl::StrCat(attention::ModeName(options.mode), options.causal ? " causal" : "",
                        " w=[", absl::StrJoin(options.segment_lengths, ","), "] r=[",
                        absl::StrJoin(options.dilation_rates, ","), "] ",
                        attention::DescribeShape(shape),
                        options.softmax_scale ? absl::StrCat(" scale=", *options.softmax_scale)
                                              : "");
  }
};

struct RandomCaseLimits {
  int64_t max_seq_len = 160;
  int64_t max_heads = 8;
  std::vector<int64_t> head_dims = {1, 3, 8, 16, 17, 32, 33, 64, 80, 128};
  std::vector<attention::DType> dtypes = {attention::DType::kFloat32, attention::DType::kFloat32,
                                          attention::DType::kFloat16, attention::DType::kBFloat16};
};

inline RandomCase DrawCase(SplitMix64& rng, const RandomCaseLimits& lim = {}) {
  RandomCase c;
  c.options.mode = rng.Uniform(0, 1) ? attention::Mode::kLongNet : attention::Mode::kHeadGroups;
  c.options.causal = rng.Uniform(0, 1) == 1;
  const int64_t branches = rng.Uniform(1, 4);
  c.shape.dtype = lim.dtypes[rng.Uniform(0, static_cast<int64_t>(lim.dtypes.size()) - 1)];
  c.shape.num_heads = rng.Uniform(1, lim.max_heads);
  if (c.options.mode == attention::Mode::kHeadGroups && c.shape.num_heads < branches) {
    c.shape.num_heads = branches + rng.Uniform(0, 3);
  }
  c.shape.head_dim = lim.head_dims[rng.Uniform(0, static_cast<int64_t>(lim.head_dims.size()) - 1)];
  const int64_t seqs = rng.Uniform(1, 3);
  const bool ragged = rng.Uniform(0, 2) == 0;
  const int64_t n = rng.Uniform(1, lim.max_seq_len);
  for (int64_t s = 0; s < seqs; ++s) {
    c.shape.seq_lengths.push_back(ragged ? rng.Uniform(1, lim.max_seq_len) : n);
  }
  for (int64_t i = 0; i < branches; ++i) {
    const int64_t w = rng.Uniform(1, lim.max_seq_len * 5 / 4);
    c.options.segment_lengths.push_back(w);
    c.options.dilation_rates.push_back(rng.Uniform(1, std::min<int64_t>(w, 9)));
  }
  if (rng.Uniform(0, 3) == 0) c.options.softmax_scale = 0.05 + 0.01 * rng.Uniform(0, 100);
  c.input_scale = rng.Uniform(0, 3) == 0 ? 3.0f : 1.0f;
  return c;
}

// A case whose branches' segment lengths share factors (powers of two, some times three), so that
// their lcm is short enough to cut sequences at: fp32, up to 4 heads, D of 8-32.
inline RandomCase DrawCuttableCase(SplitMix64& rng, int64_t max_seq_len) {
  RandomCaseLimits limits;
  limits.max_seq_len = max_seq_len;
  limits.max_heads = 4;
  limits.head_dims = {8, 16, 32};
  limits.dtypes = {attention::DType::kFloat32};
  RandomCase c = DrawCase(rng, limits);
  for (size_t i = 0; i < c.options.segment_lengths.size(); ++i) {
    const int64_t w = (rng.Uniform(0, 3) == 0 ? 3 : 1) << rng.Uniform(0, 6);
    c.options.segment_lengths[i] = w;
    c.options.dilation_rates[i] = rng.Uniform(1, std::min<int64_t>(w, 8));
  }
  return c;
}

// Inputs of a plan's shape, drawn from rng and rounded to its dtype.
struct RandomInputs {
  TypedBuffer q, k, v;
};

inline RandomInputs DrawInputs(SplitMix64& rng, const attention::AttentionPlan& plan,
                               float scale) {
  const size_t n = plan.tensor_bytes / attention::DTypeSize(plan.shape.dtype);
  RandomInputs in{TypedBuffer(plan.shape.dtype, n), TypedBuffer(plan.shape.dtype, n),
                  TypedBuffer(plan.shape.dtype, n)};
  for (TypedBuffer* t : {&in.q, &in.k, &in.v}) {
    for (size_t i = 0; i < n; ++i) t->Set(i, rng.NextFloat(scale));
  }
  return in;
}

// The naive implementation: count[p][k] = how many branches give key k to query p.
inline std::vector<double> NaiveAttention(const attention::AttentionPlan& plan,
                                          const TypedBuffer& q, const TypedBuffer& k,
                                          const TypedBuffer& v) {
  const auto& o = plan.options;
  const int64_t heads = plan.shape.num_heads;
  const int64_t dim = plan.shape.head_dim;
  const int64_t groups = static_cast<int64_t>(o.segment_lengths.size());
  const double scale = o.softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(dim)));
  std::vector<double> out(q.count(), 0.0);
  int64_t base = 0;
  for (int64_t n : plan.shape.seq_lengths) {
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<int> count(static_cast<size_t>(n * n), 0);
      for (int64_t b = 0; b < groups; ++b) {
        int64_t offset;
        if (o.mode == attention::Mode::kLongNet) {
          const int64_t r = o.dilation_rates[b];
          offset = h / ((heads + r - 1) / r);
        } else {
          // Group b holds heads [sum of earlier sizes, + size), sizes H/G with H%G one larger.
          int64_t begin = 0;
          for (int64_t g = 0; g < b; ++g) begin += heads / groups + (g < heads % groups ? 1 : 0);
          const int64_t size = heads / groups + (b < heads % groups ? 1 : 0);
          if (h < begin || h >= begin + size) continue;
          offset = b % o.dilation_rates[b];
        }
        const int64_t w = std::min(o.segment_lengths[b], n);
        const int64_t r = o.dilation_rates[b];
        for (int64_t p = 0; p < n; ++p) {
          const int64_t start = p / w * w;
          if ((p - start) % r != offset) continue;
          for (int64_t key = start; key < std::min(start + w, n); ++key) {
            if ((key - start) % r != offset) continue;
            if (o.causal && key > p) continue;
            ++count[static_cast<size_t>(p * n + key)];
          }
        }
      }
      auto at = [&](int64_t token, int64_t d) {
        return static_cast<size_t>(((base + token) * heads + h) * dim + d);
      };
      for (int64_t p = 0; p < n; ++p) {
        std::vector<double> logits(static_cast<size_t>(n), 0.0);
        double max_logit = -INFINITY;
        for (int64_t key = 0; key < n; ++key) {
          if (count[static_cast<size_t>(p * n + key)] == 0) continue;
          double dot = 0;
          for (int64_t d = 0; d < dim; ++d) dot += double{q.Get(at(p, d))} * k.Get(at(key, d));
          logits[static_cast<size_t>(key)] = dot * scale;
          max_logit = std::max(max_logit, dot * scale);
        }
        if (max_logit == -INFINITY) continue;  // no branch keeps (p, h): output stays 0
        double denom = 0;
        std::vector<double> acc(static_cast<size_t>(dim), 0.0);
        for (int64_t key = 0; key < n; ++key) {
          const int c = count[static_cast<size_t>(p * n + key)];
          if (c == 0) continue;
          const double weight = c * std::exp(logits[static_cast<size_t>(key)] - max_logit);
          denom += weight;
          for (int64_t d = 0; d < dim; ++d) acc[static_cast<size_t>(d)] += weight * v.Get(at(key, d));
        }
        for (int64_t d = 0; d < dim; ++d) out[at(p, d)] = acc[static_cast<size_t>(d)] / denom;
      }
    }
    base += n;
  }
  return out;
}

}  // namespace dilattn::testing
