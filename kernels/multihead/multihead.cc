#include "kernels/multihead/multihead.h"

#include <atomic>

#include "absl/strings/str_cat.h"
#include "kernels/common/quote.h"

namespace dilattn::multihead {
namespace {

std::atomic<uint64_t> next_weights_id{1};

// (out, in) row-major -> (in, out) row-major.
std::vector<float> Transpose(const std::vector<float>& w, int64_t e) {
  std::vector<float> t(w.size());
  for (int64_t o = 0; o < e; ++o) {
    for (int64_t i = 0; i < e; ++i)
      t[static_cast<size_t>(i * e + o)] = w[static_cast<size_t>(o * e + i)];
  }
  return t;
}

// An optional vector of E values: `fill` where the file has none.
absl::StatusOr<std::vector<float>> Optional(const SafetensorsFile& file, const std::string& name,
                                            int64_t e, float fill) {
  absl::StatusOr<std::vector<float>> v = file.ReadFloat(name, {e});
  if (absl::IsNotFound(v.status())) return std::vector<float>(static_cast<size_t>(e), fill);
  return v;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const MultiheadWeights>> LoadWeights(const SafetensorsFile& file,
                                                                    const WeightsOptions& options) {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights file ", Quote(file.source()), ": ", what));
  };
  const std::string& p = options.prefix;
  const SafetensorsEntry* q = file.Find(p + "q_proj.weight");
  if (q == nullptr) {
    return bad(absl::StrCat("no tensor ", Quote(p + "q_proj.weight"),
                            " (expected q_proj, k_proj, v_proj and out_proj weights under the "
                            "prefix ",
                            Quote(p), ")"));
  }
  if (q->shape.size() != 2 || q->shape[0] != q->shape[1] || q->shape[0] < 1) {
    return bad(absl::StrCat(Quote(p + "q_proj.weight"), " must be a square (E, E) matrix"));
  }
  auto w = std::make_shared<MultiheadWeights>();
  const int64_t e = q->shape[0];
  if (options.num_heads < 1 || e % options.num_heads != 0) {
    return bad(
        absl::StrCat("embed dim E=", e, " is not a multiple of num_heads=", options.num_heads));
  }
  if (!(options.layer_norm_eps > 0) || !std::isfinite(options.layer_norm_eps)) {
    return bad(absl::StrCat("layer_norm_eps=", options.layer_norm_eps, " must be finite and > 0"));
  }
  w->embed_dim = e;
  w->num_heads = options.num_heads;
  w->source = file.source();
  w->layer_norm_eps = options.layer_norm_eps;
  struct Projection {
    const char* name;
    std::vector<float>* wt;
    std::vector<float>* bias;
  };
  for (const Projection& proj :
       {Projection{"q_proj", &w->wt_q, &w->b_q}, Projection{"k_proj", &w->wt_k, &w->b_k},
        Projection{"v_proj", &w->wt_v, &w->b_v}, Projection{"out_proj", &w->wt_out, &w->b_out}}) {
    absl::StatusOr<std::vector<float>> m =
        file.ReadFloat(absl::StrCat(p, proj.name, ".weight"), {e, e});
    if (!m.ok()) return m.status();
    *proj.wt = Transpose(*m, e);
    absl::StatusOr<std::vector<float>> b =
        Optional(file, absl::StrCat(p, proj.name, ".bias"), e, 0);
    if (!b.ok()) return b.status();
    *proj.bias = *std::move(b);
  }
  // torchscale names the sub-layer norm inner_attn_ln, dilated-attention-pytorch names it norm.
  const bool torchscale = file.Find(p + "inner_attn_ln.weight") != nullptr ||
                          file.Find(p + "inner_attn_ln.bias") != nullptr;
  const bool dap = file.Find(p + "norm.weight") != nullptr || file.Find(p + "norm.bias") != nullptr;
  if (torchscale && dap) {
    return bad(absl::StrCat("both ", Quote(p + "inner_attn_ln"), " and ", Quote(p + "norm"),
                            " are present; keep one sub-layer norm"));
  }
  if (torchscale || dap) {
    const std::string ln = p + (torchscale ? "inner_attn_ln" : "norm");
    absl::StatusOr<std::vector<float>> g = Optional(file, ln + ".weight", e, 1);
    if (!g.ok()) return g.status();
    absl::StatusOr<std::vector<float>> b = Optional(file, ln + ".bias", e, 0);
    if (!b.ok()) return b.status();
    w->layer_norm = true;
    w->ln_weight = *std::move(g);
    w->ln_bias = *std::move(b);
  }
  w->id = next_weights_id.fetch_add(1);
  return std::shared_ptr<const MultiheadWeights>(std::move(w));
}

absl::StatusOr<std::shared_ptr<const MultiheadWeights>> LoadWeightsFile(
    const std::string& path, const WeightsOptions& options) {
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Read(path);
  if (!file.ok()) return file.status();
  return LoadWeights(*file, options);
}

absl::StatusOr<MultiheadPlan> PlanMultihead(std::shared_ptr<const MultiheadWeights> weights,
                                            const attention::AttentionOptions& options,
                                            const attention::ProblemShape& shape) {
  if (weights == nullptr) return absl::InvalidArgumentError("multihead plan without weights");
  const int64_t e = weights->embed_dim, h = weights->num_heads;
  if (shape.num_heads != h || shape.head_dim * shape.num_heads != e) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden states of ", shape.num_heads * shape.head_dim,
                     " features as H=", shape.num_heads, " x D=", shape.head_dim,
                     ", but the weights of ", Quote(weights->source), " have E=", e, " and H=", h));
  }
  absl::StatusOr<attention::AttentionPlan> a = attention::PlanAttention(options, shape);
  if (!a.ok()) return a.status();
  MultiheadPlan plan;
  plan.tensor_bytes = a->tensor_bytes;
  plan.flops = a->flops + 8.0 * static_cast<double>(a->params.total_tokens) *
                              static_cast<double>(e) * static_cast<double>(e);
  plan.attention = *std::move(a);
  plan.weights = std::move(weights);
  return plan;
}

}  // namespace dilattn::multihead
