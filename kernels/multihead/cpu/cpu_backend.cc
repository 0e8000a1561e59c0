// The multihead module on the CPU: the projections on the blocked fp32 GEMM, the attention on the
// CPU attention backend, everything in fp32 whatever the dtype of X and Y.

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/attention/cpu/tile_runner.h"
#include "kernels/attention/dtype.h"
#include "kernels/multihead/cpu/gemm.h"
#include "kernels/multihead/multihead.h"

namespace dilattn::multihead {
namespace {

using attention::DType;

constexpr size_t kAlign = 64;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The attention in the middle runs on fp32 tensors.
absl::StatusOr<attention::AttentionPlan> Fp32Attention(const MultiheadPlan& plan) {
  attention::ProblemShape shape = plan.attention.shape;
  shape.dtype = DType::kFloat32;
  return attention::PlanAttention(plan.attention.options, shape);
}

class CpuMultiheadBackend final : public MultiheadBackend {
 public:
  CpuMultiheadBackend(std::unique_ptr<attention::cpu::TileRunner> runner,
                      std::unique_ptr<attention::AttentionBackend> owned,
                      attention::AttentionBackend* attention)
      : runner_(std::move(runner)),
        owned_(std::move(owned)),
        attention_(attention != nullptr ? attention : owned_.get()),
        gemm_(cpu::GemmBlockFor(runner_->isa())),
        name_(absl::StrCat("cpu-", runner_->isa())) {}

  absl::string_view name() const override { return name_; }
  DeviceLoc location() const override { return DeviceLoc::Host(); }

  absl::Status Supports(const MultiheadPlan& plan) const override {
    absl::StatusOr<attention::AttentionPlan> a = Fp32Attention(plan);
    return a.ok() ? attention_->Supports(*a) : a.status();
  }

  size_t WorkspaceBytes(const MultiheadPlan& plan) const override {
    absl::StatusOr<attention::AttentionPlan> a = Fp32Attention(plan);
    if (!a.ok()) return 0;
    return OwnBytes(*a) + AlignUp(attention_->WorkspaceBytes(*a));
  }

  absl::Status Run(const MultiheadPlan& plan, const MultiheadTensors& t,
                   attention::TensorRef workspace) override {
    absl::StatusOr<attention::AttentionPlan> a = Fp32Attention(plan);
    if (!a.ok()) return a.status();
    if (absl::Status s = attention_->Supports(*a); !s.ok()) return s;
    const size_t bytes = a->tensor_bytes;
    if (t.x.bytes != plan.tensor_bytes || t.y.bytes != plan.tensor_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "X and Y must hold ", plan.tensor_bytes, " bytes; got ", t.x.bytes, " and ", t.y.bytes));
    }
    if (!t.x.location.is_host() || !t.y.location.is_host() || !workspace.location.is_host()) {
      return absl::InvalidArgumentError("the CPU multihead backend needs host memory");
    }
    // The attention checks its own part of the workspace when it runs.
    if (workspace.bytes < OwnBytes(*a)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "workspace of ", workspace.bytes, " bytes; the plan needs ", WorkspaceBytes(plan)));
    }
    const MultiheadWeights& w = *plan.weights;
    const DType dtype = plan.attention.shape.dtype;
    const int64_t e = w.embed_dim, tokens = a->params.total_tokens;
    auto* base = static_cast<std::byte*>(workspace.data);
    float* buf[5];
    for (int i = 0; i < 5; ++i) buf[i] = reinterpret_cast<float*>(base + i * AlignUp(bytes));
    float *x32 = buf[0], *q = buf[1], *k = buf[2], *v = buf[3], *o = buf[4];
    attention::cpu::ThreadPool& pool = runner_->pool();

    // Rows of E values at a time, so that each worker converts a contiguous stretch.
    auto rows = [&](auto&& fn) {
      pool.ParallelFor(tokens, [&](int64_t row, int) { fn(static_cast<size_t>(row * e)); });
    };
    rows([&](size_t at) {
      for (int64_t j = 0; j < e; ++j) x32[at + j] = attention::LoadAsFloat(t.x.data, dtype, at + j);
    });
    auto project = [&](const float* in, const std::vector<float>& wt, const std::vector<float>& b,
                       float* out) {
      cpu::Gemm({in, e, wt.data(), e, b.data(), out, e, tokens, e, e}, gemm_, pool);
    };
    project(x32, w.wt_q, w.b_q, q);
    project(x32, w.wt_k, w.b_k, k);
    project(x32, w.wt_v, w.b_v, v);
    const DeviceLoc host = DeviceLoc::Host();
    attention::TensorRef att_ws{base + OwnBytes(*a), workspace.bytes - OwnBytes(*a), host};
    if (absl::Status s = attention_->Run(
            *a, {{q, bytes, host}, {k, bytes, host}, {v, bytes, host}, {o, bytes, host}}, att_ws);
        !s.ok()) {
      return s;
    }
    if (w.layer_norm) {
      rows([&](size_t at) {
        float* r = o + at;
        double mean = 0, var = 0;
        for (int64_t j = 0; j < e; ++j) mean += r[j];
        mean /= static_cast<double>(e);
        for (int64_t j = 0; j < e; ++j) var += (r[j] - mean) * (r[j] - mean);
        var /= static_cast<double>(e);
        const double inv = 1.0 / std::sqrt(var + w.layer_norm_eps);
        for (int64_t j = 0; j < e; ++j) {
          r[j] = static_cast<float>((r[j] - mean) * inv) * w.ln_weight[static_cast<size_t>(j)] +
                 w.ln_bias[static_cast<size_t>(j)];
        }
      });
    }
    // Y in fp32 first (X's buffer is free by now), rounded into the caller's dtype once.
    project(o, w.wt_out, w.b_out, x32);
    rows([&](size_t at) {
      for (int64_t j = 0; j < e; ++j)
        attention::StoreFromFloat(t.y.data, dtype, at + j, x32[at + j]);
    });
    return absl::OkStatus();
  }

 private:
  // The module's part of the workspace, ahead of the attention's: X in fp32, Q, K, V and the
  // attention's output (reused for Y before its rounding).
  static size_t OwnBytes(const attention::AttentionPlan& fp32) {
    return 5 * AlignUp(fp32.tensor_bytes);
  }

  std::unique_ptr<attention::cpu::TileRunner> runner_;  // the GEMMs' threads and instruction set
  std::unique_ptr<attention::AttentionBackend> owned_;
  attention::AttentionBackend* attention_;
  cpu::GemmBlockFn gemm_;
  std::string name_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<MultiheadBackend>> CreateCpuMultiheadBackend(
    const attention::CpuBackendOptions& options, attention::AttentionBackend* attention) {
  if (attention != nullptr && !attention->location().is_host()) {
    return absl::InvalidArgumentError("the CPU multihead backend needs a CPU attention backend");
  }
  absl::StatusOr<std::unique_ptr<attention::cpu::TileRunner>> runner =
      attention::cpu::TileRunner::Create(options.num_threads, options.isa);
  if (!runner.ok()) return runner.status();
  std::unique_ptr<attention::AttentionBackend> owned;
  if (attention == nullptr) {
    attention::CpuBackendOptions same = options;
    same.isa = std::string((*runner)->isa());
    absl::StatusOr<std::unique_ptr<attention::AttentionBackend>> att =
        attention::CreateCpuBackend(same);
    if (!att.ok()) return att.status();
    owned = *std::move(att);
  }
  return std::unique_ptr<MultiheadBackend>(
      new CpuMultiheadBackend(*std::move(runner), std::move(owned), attention));
}

}  // namespace dilattn::multihead
