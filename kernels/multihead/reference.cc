// The multihead module in float64, written as directly as the definition reads: no blocking, no
// threads. The attention in the middle is the attention reference on fp32 Q, K, V.

#include "kernels/attention/reference.h"

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention/dtype.h"
#include "kernels/multihead/multihead.h"

namespace dilattn::multihead {
namespace {

// x as `storage` holds it.
double Round(double x, attention::DType storage) {
  float f = static_cast<float>(x);
  attention::StoreFromFloat(&f, storage, 0, f);
  return attention::LoadAsFloat(&f, storage, 0);
}

std::vector<float> Rounded(const std::vector<float>& v, attention::DType storage) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(Round(v[i], storage));
  return out;
}

// out (tokens, E) = in (tokens, E) . wt + b, in float64.
void Project(const std::vector<double>& in, const std::vector<float>& wt,
             const std::vector<float>& b, int64_t tokens, int64_t e, std::vector<double>* out) {
  out->assign(static_cast<size_t>(tokens * e), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    double* row = out->data() + t * e;
    for (int64_t j = 0; j < e; ++j) row[j] = b[static_cast<size_t>(j)];
    for (int64_t i = 0; i < e; ++i) {
      const double x = in[static_cast<size_t>(t * e + i)];
      const float* w = wt.data() + i * e;
      for (int64_t j = 0; j < e; ++j) row[j] += x * static_cast<double>(w[j]);
    }
  }
}

}  // namespace

absl::Status ReferenceMultihead(const MultiheadPlan& plan, const MultiheadTensors& tensors,
                                attention::DType storage) {
  const MultiheadWeights& w = *plan.weights;
  const attention::DType dtype = plan.attention.shape.dtype;
  const int64_t e = w.embed_dim, tokens = plan.attention.params.total_tokens;
  if (tensors.x.bytes != plan.tensor_bytes || tensors.y.bytes != plan.tensor_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("X and Y must hold ", plan.tensor_bytes, " bytes"));
  }
  const size_t n = static_cast<size_t>(tokens * e);
  std::vector<double> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = attention::LoadAsFloat(tensors.x.data, dtype, i);

  attention::ProblemShape shape = plan.attention.shape;
  shape.dtype = attention::DType::kFloat32;
  absl::StatusOr<attention::AttentionPlan> a =
      attention::PlanAttention(plan.attention.options, shape);
  if (!a.ok()) return a.status();
  std::vector<double> proj;
  std::vector<float> qkv[3], o(n);
  const std::vector<float>* wts[4] = {&w.wt_q, &w.wt_k, &w.wt_v, &w.wt_out};
  const std::vector<float>* bs[4] = {&w.b_q, &w.b_k, &w.b_v, &w.b_out};
  for (int i = 0; i < 3; ++i) {
    Project(x, Rounded(*wts[i], storage), Rounded(*bs[i], storage), tokens, e, &proj);
    qkv[i].resize(n);
    for (size_t j = 0; j < n; ++j) qkv[i][j] = static_cast<float>(Round(proj[j], storage));
  }
  const DeviceLoc host = DeviceLoc::Host();
  const size_t bytes = n * sizeof(float);
  absl::Status s = attention::ReferenceAttention(*a, {{qkv[0].data(), bytes, host},
                                                      {qkv[1].data(), bytes, host},
                                                      {qkv[2].data(), bytes, host},
                                                      {o.data(), bytes, host}});
  if (!s.ok()) return s;

  std::vector<double> attn(n);
  for (size_t j = 0; j < n; ++j) attn[j] = Round(o[j], storage);
  if (w.layer_norm) {
    for (int64_t t = 0; t < tokens; ++t) {
      double* row = attn.data() + t * e;
      double mean = 0, var = 0;
      for (int64_t j = 0; j < e; ++j) mean += row[j];
      mean /= static_cast<double>(e);
      for (int64_t j = 0; j < e; ++j) var += (row[j] - mean) * (row[j] - mean);
      var /= static_cast<double>(e);
      const double inv = 1.0 / std::sqrt(var + w.layer_norm_eps);
      for (int64_t j = 0; j < e; ++j) {
        row[j] = Round((row[j] - mean) * inv * w.ln_weight[static_cast<size_t>(j)] +
                           w.ln_bias[static_cast<size_t>(j)],
                       storage);
      }
    }
  }
  Project(attn, Rounded(*wts[3], storage), Rounded(*bs[3], storage), tokens, e, &proj);
  for (size_t i = 0; i < n; ++i) {
    attention::StoreFromFloat(tensors.y.data, dtype, i, static_cast<float>(proj[i]));
  }
  return absl::OkStatus();
}

}  // namespace dilattn::multihead
