// The multihead module on a GPU: the four projections on cuBLASLt (fp16 / bf16 operands, fp32
// accumulation, the bias added in the epilogue), the fused dilated-attention kernel between them,
// the sub-layer norm as one small kernel. Host compiler; CUDA only through its runtime API.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/attention/dtype.h"
#include "kernels/attention/padded_plan.h"
#include "kernels/multihead/cuda/cublaslt_loader.h"
#include "kernels/multihead/cuda/launch.h"
#include "kernels/multihead/multihead.h"

namespace dilattn::multihead {
namespace {

using attention::DType;

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
// cuBLASLt's scratch for the projections; its heuristics are asked within this budget.
constexpr size_t kLtWorkspace = size_t{32} << 20;

absl::Status Cuda(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  const std::string m =
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  return err == cudaErrorMemoryAllocation ? absl::ResourceExhaustedError(m)
                                          : absl::InternalError(m);
}

absl::Status Lt(const cuda::CublasLt& lt, cublasStatus_t st, absl::string_view what) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string m = absl::StrCat(what, ": ", lt.GetStatusName(st));
  return st == CUBLAS_STATUS_ALLOC_FAILED ? absl::ResourceExhaustedError(m)
                                          : absl::InternalError(m);
}

cudaDataType_t CudaType(DType t) { return t == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F; }

// Where the heads' columns lie between the projections. A head dim D without an attention kernel
// runs padded to one that has (kernels/attention/padded_plan.h): Q, K, V and O are (tokens, H, Dp)
// with zero columns D..Dp-1 in every head, which the projections' weights put there (zero rows
// of W_q, W_k, W_v and zero biases) and the output projection ignores (zero columns of W_out).
struct Heads {
  int64_t num_heads = 0;
  int64_t head_dim = 0;  // D
  int64_t pad_dim = 0;   // Dp >= D
  int64_t width() const { return num_heads * pad_dim; }
  bool padded() const { return pad_dim != head_dim; }
};

// `v` of H x D values (a bias, the norm's parameters) as H x Dp, zeros in the pads.
std::vector<float> PadVector(const std::vector<float>& v, const Heads& h) {
  if (!h.padded()) return v;
  std::vector<float> out(static_cast<size_t>(h.width()), 0.0f);
  for (int64_t head = 0; head < h.num_heads; ++head) {
    std::copy_n(v.begin() + head * h.head_dim, h.head_dim, out.begin() + head * h.pad_dim);
  }
  return out;
}

// A projection into the heads, stored transposed as (E_in, E) row-major, as (E_in, H x Dp).
std::vector<float> PadColumns(const std::vector<float>& wt, int64_t rows, const Heads& h) {
  if (!h.padded()) return wt;
  const int64_t e = h.num_heads * h.head_dim;
  std::vector<float> out(static_cast<size_t>(rows * h.width()), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t head = 0; head < h.num_heads; ++head) {
      std::copy_n(wt.begin() + r * e + head * h.head_dim, h.head_dim,
                  out.begin() + r * h.width() + head * h.pad_dim);
    }
  }
  return out;
}

// The output projection, stored transposed as (E, E_out) row-major, as (H x Dp, E_out).
std::vector<float> PadRows(const std::vector<float>& wt, int64_t cols, const Heads& h) {
  if (!h.padded()) return wt;
  std::vector<float> out(static_cast<size_t>(h.width() * cols), 0.0f);
  for (int64_t head = 0; head < h.num_heads; ++head) {
    for (int64_t d = 0; d < h.head_dim; ++d) {
      std::copy_n(wt.begin() + (head * h.head_dim + d) * cols, cols,
                  out.begin() + (head * h.pad_dim + d) * cols);
    }
  }
  return out;
}

// One set of weights on this device in one dtype and head layout: the four transposed
// projections and their biases in the dtype (cuBLASLt's bias takes the output's type), the
// norm's parameters in fp32.
struct DeviceWeights {
  void* wt[4] = {};  // q, k, v, out
  void* bias[4] = {};
  float* ln_weight = nullptr;
  float* ln_bias = nullptr;
  ~DeviceWeights() {
    for (int i = 0; i < 4; ++i) {
      cudaFree(wt[i]);
      cudaFree(bias[i]);
    }
    cudaFree(ln_weight);
    cudaFree(ln_bias);
  }
};

// Uploads `w` in `dtype` and the layout `h` to the current device.
absl::StatusOr<std::unique_ptr<DeviceWeights>> Upload(const MultiheadWeights& w, DType dtype,
                                                      const Heads& h) {
  auto d = std::make_unique<DeviceWeights>();
  const int64_t e = w.embed_dim;
  const size_t width = static_cast<size_t>(h.width());
  std::vector<uint16_t> host;
  auto upload = [&](const std::vector<float>& src, void** dst) -> absl::Status {
    host.resize(src.size());
    for (size_t i = 0; i < src.size(); ++i) {
      host[i] = dtype == DType::kBFloat16 ? attention::FloatToBFloat16Bits(src[i])
                                          : attention::FloatToHalfBits(src[i]);
    }
    const size_t bytes = host.size() * sizeof(uint16_t);
    if (absl::Status s = Cuda(cudaMalloc(dst, bytes), "weights"); !s.ok()) return s;
    return Cuda(cudaMemcpy(*dst, host.data(), bytes, cudaMemcpyHostToDevice), "weights upload");
  };
  const std::vector<float>* wts[3] = {&w.wt_q, &w.wt_k, &w.wt_v};
  const std::vector<float>* bs[3] = {&w.b_q, &w.b_k, &w.b_v};
  for (int i = 0; i < 3; ++i) {
    if (absl::Status s = upload(PadColumns(*wts[i], e, h), &d->wt[i]); !s.ok()) return s;
    if (absl::Status s = upload(PadVector(*bs[i], h), &d->bias[i]); !s.ok()) return s;
  }
  if (absl::Status s = upload(PadRows(w.wt_out, e, h), &d->wt[3]); !s.ok()) return s;
  if (absl::Status s = upload(w.b_out, &d->bias[3]); !s.ok()) return s;
  if (w.layer_norm) {
    for (auto [src, dst] :
         {std::pair{&w.ln_weight, &d->ln_weight}, std::pair{&w.ln_bias, &d->ln_bias}}) {
      const std::vector<float> padded = PadVector(*src, h);
      if (absl::Status s =
              Cuda(cudaMalloc(reinterpret_cast<void**>(dst), width * sizeof(float)), "weights");
          !s.ok()) {
        return s;
      }
      if (absl::Status s =
              Cuda(cudaMemcpy(*dst, padded.data(), width * sizeof(float), cudaMemcpyHostToDevice),
                   "weights upload");
          !s.ok()) {
        return s;
      }
    }
  }
  return d;
}

// The backends of one device (an executor has one per stream) share one upload of each set of
// weights in each dtype and layout; it is freed when the last of them lets go.
absl::StatusOr<std::shared_ptr<const DeviceWeights>> SharedUpload(int device,
                                                                  const MultiheadWeights& w,
                                                                  DType dtype, const Heads& h) {
  static absl::Mutex mu(absl::kConstInit);
  static auto* uploads ABSL_GUARDED_BY(mu) =
      new std::map<std::tuple<int, uint64_t, DType, int64_t>, std::weak_ptr<const DeviceWeights>>();
  absl::MutexLock lock(&mu);
  std::weak_ptr<const DeviceWeights>& slot = (*uploads)[{device, w.id, dtype, h.pad_dim}];
  if (std::shared_ptr<const DeviceWeights> held = slot.lock()) return held;
  absl::StatusOr<std::unique_ptr<DeviceWeights>> made = Upload(w, dtype, h);
  if (!made.ok()) return made.status();
  std::shared_ptr<const DeviceWeights> held(*std::move(made));
  slot = held;
  return held;
}

// cuBLASLt's description of a projection of `tokens` rows of `in` features to `out` features, with
// the algorithm it chose.
struct LtShape {
  const cuda::CublasLt* lt = nullptr;
  cublasLtMatrixLayout_t w = nullptr, x = nullptr, y = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~LtShape() {
    for (cublasLtMatrixLayout_t l : {w, x, y}) {
      if (l != nullptr) lt->MatrixLayoutDestroy(l);
    }
  }
};

class CudaMultiheadBackend final : public MultiheadBackend {
 public:
  CudaMultiheadBackend(const cuda::CublasLt* api, int device, cudaStream_t stream,
                       std::unique_ptr<attention::AttentionBackend> attention)
      : api_(*api), device_(device), stream_(stream), attention_(std::move(attention)) {}
  ~CudaMultiheadBackend() override {
    cudaSetDevice(device_);
    shapes_.clear();
    weights_.clear();
    if (op_ != nullptr) api_.MatmulDescDestroy(op_);
    if (pref_ != nullptr) api_.MatmulPreferenceDestroy(pref_);
    if (lt_ != nullptr) api_.Destroy(lt_);
  }

  absl::Status Init() {
    if (absl::Status s = Cuda(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    if (absl::Status s = Lt(api_, api_.Create(&lt_), "cublasLtCreate"); !s.ok()) return s;
    if (absl::Status s = Lt(api_, api_.MatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                            "cublasLtMatmulDescCreate");
        !s.ok()) {
      return s;
    }
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    if (absl::Status s = Lt(api_,
                            api_.MatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                        &epilogue, sizeof(epilogue)),
                            "epilogue");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Lt(api_, api_.MatmulPreferenceCreate(&pref_), "preference"); !s.ok()) {
      return s;
    }
    const uint64_t ws = kLtWorkspace;
    return Lt(api_,
              api_.MatmulPreferenceSetAttribute(pref_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &ws, sizeof(ws)),
              "workspace preference");
  }

  absl::string_view name() const override { return name_; }
  DeviceLoc location() const override { return DeviceLoc::Cuda(device_); }

  absl::Status Supports(const MultiheadPlan& plan) const override { return Select(plan).status(); }

  bool RunsPadded(const MultiheadPlan& plan) const override {
    absl::StatusOr<Layout> layout = Select(plan);
    return layout.ok() && layout->heads.padded();
  }

  size_t WorkspaceBytes(const MultiheadPlan& plan) const override {
    absl::StatusOr<Layout> layout = Select(plan);
    if (!layout.ok()) return 0;  // Supports() refuses the plan, and so does Run()
    return OwnBytes(layout->attention) + AlignUp(attention_->WorkspaceBytes(layout->attention));
  }

  absl::Status Run(const MultiheadPlan& plan, const MultiheadTensors& t,
                   attention::TensorRef workspace) override {
    absl::StatusOr<Layout> layout = Select(plan);
    if (!layout.ok()) return layout.status();
    const attention::AttentionPlan& att = layout->attention;
    const DeviceLoc here = location();
    if (t.x.location != here || t.y.location != here || workspace.location != here) {
      return absl::InvalidArgumentError(
          absl::StrCat("X, Y and the workspace must be on ", here.ToString()));
    }
    if (t.x.bytes != plan.tensor_bytes || t.y.bytes != plan.tensor_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "X and Y must hold ", plan.tensor_bytes, " bytes; got ", t.x.bytes, " and ", t.y.bytes));
    }
    // The attention checks its own part when it runs (sizing it walks the tile list, which the
    // caller has just done to lease the workspace).
    if (workspace.bytes < OwnBytes(att)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "workspace of ", workspace.bytes, " bytes; the plan needs ", WorkspaceBytes(plan)));
    }
    if (absl::Status s = Cuda(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    const DType dtype = plan.attention.shape.dtype;
    absl::StatusOr<const DeviceWeights*> w = Weights(*plan.weights, dtype, layout->heads);
    if (!w.ok()) return w.status();
    const int64_t tokens = plan.attention.params.total_tokens;
    const int64_t e = plan.weights->embed_dim, width = layout->heads.width();
    // Batches of many lengths would grow the descriptions without bound; they are cheap to
    // remake. Cleared before a run asks for its two, which must both stay valid.
    if (shapes_.size() >= 64) shapes_.clear();
    absl::StatusOr<const LtShape*> into_heads = Shape(e, width, tokens, dtype);
    if (!into_heads.ok()) return into_heads.status();
    absl::StatusOr<const LtShape*> out_of_heads = Shape(width, e, tokens, dtype);
    if (!out_of_heads.ok()) return out_of_heads.status();

    auto* base = static_cast<std::byte*>(workspace.data);
    const size_t bytes = att.tensor_bytes;  // of each of Q, K, V, O: (tokens, H, Dp)
    const size_t step = AlignUp(bytes);
    void* q = base;
    void* k = base + step;
    void* v = base + 2 * step;
    void* o = base + 3 * step;
    void* lt_ws = base + 4 * step;
    attention::TensorRef att_ws{base + OwnBytes(att), workspace.bytes - OwnBytes(att), here};
    for (auto [which, out] : {std::pair{0, q}, std::pair{1, k}, std::pair{2, v}}) {
      if (absl::Status s =
              Project(**into_heads, (*w)->wt[which], (*w)->bias[which], t.x.data, out, lt_ws);
          !s.ok()) {
        return s;
      }
    }
    if (absl::Status s = attention_->Run(
            att, {{q, bytes, here}, {k, bytes, here}, {v, bytes, here}, {o, bytes, here}}, att_ws);
        !s.ok()) {
      return s;
    }
    if (plan.weights->layer_norm) {
      const Heads& h = layout->heads;
      if (absl::Status s =
              Cuda(static_cast<cudaError_t>(cuda::LaunchLayerNorm(
                       o, tokens, {h.num_heads, h.head_dim, h.pad_dim}, dtype, (*w)->ln_weight,
                       (*w)->ln_bias, static_cast<float>(plan.weights->layer_norm_eps), stream_)),
                   "layer norm");
          !s.ok()) {
        return s;
      }
    }
    return Project(**out_of_heads, (*w)->wt[3], (*w)->bias[3], o, t.y.data, lt_ws);
  }

 private:
  // How a plan runs: its heads' layout and the attention plan the fused kernel takes, at the
  // weights' head dim or padded to one (padded_plan.h).
  struct Layout {
    Heads heads;
    attention::AttentionPlan attention;
  };
  // The one selector: fp16 / bf16, an E whose rows keep cuBLASLt's 16-byte vectors, and an
  // attention the fused kernel runs, padded or not.
  absl::StatusOr<Layout> Select(const MultiheadPlan& plan) const {
    const DType t = plan.attention.shape.dtype;
    if (t != DType::kFloat16 && t != DType::kBFloat16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the GPU multihead path computes in fp16 or bf16, not ", attention::DTypeName(t)));
    }
    if (plan.weights->embed_dim % 8 != 0) {
      return absl::InvalidArgumentError(absl::StrCat("embed dim E=", plan.weights->embed_dim,
                                                     " is not a multiple of 8 (GPU rows are read "
                                                     "16 bytes at a time)"));
    }
    absl::StatusOr<attention::AttentionPlan> att =
        attention::PlanAsRun(plan.attention, *attention_);
    if (!att.ok()) return att.status();
    const attention::ProblemShape& shape = plan.attention.shape;
    return Layout{{shape.num_heads, shape.head_dim, att->shape.head_dim}, *std::move(att)};
  }

  // The module's part of the workspace, ahead of the attention's: Q, K, V, the attention's output
  // (each in the heads' layout) and cuBLASLt's scratch.
  static size_t OwnBytes(const attention::AttentionPlan& att) {
    return 4 * AlignUp(att.tensor_bytes) + kLtWorkspace;
  }

  absl::Status Project(const LtShape& shape, const void* wt, const void* bias, const void* in,
                       void* out, void* lt_ws) {
    if (absl::Status s = Lt(api_,
                            api_.MatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                        &bias, sizeof(bias)),
                            "bias pointer");
        !s.ok()) {
      return s;
    }
    const float alpha = 1, beta = 0;
    // Column-major view: Y^T (out, tokens) = W (out, in) . X^T (in, tokens), W being wt read
    // column-major.
    return Lt(api_,
              api_.Matmul(lt_, op_, &alpha, wt, shape.w, in, shape.x, &beta, out, shape.y, out,
                          shape.y, &shape.algo, lt_ws, kLtWorkspace, stream_),
              "cublasLtMatmul");
  }

  absl::StatusOr<const DeviceWeights*> Weights(const MultiheadWeights& w, DType dtype,
                                               const Heads& h) {
    auto key = std::make_tuple(w.id, dtype, h.pad_dim);
    if (auto it = weights_.find(key); it != weights_.end()) return it->second.get();
    absl::StatusOr<std::shared_ptr<const DeviceWeights>> shared =
        SharedUpload(device_, w, dtype, h);
    if (!shared.ok()) return shared.status();
    return (weights_[key] = *std::move(shared)).get();
  }

  // cuBLASLt's description of the projection; Run() clears them before it asks.
  absl::StatusOr<const LtShape*> Shape(int64_t in, int64_t out, int64_t tokens, DType dtype) {
    auto key = std::make_tuple(in, out, tokens, dtype);
    if (auto it = shapes_.find(key); it != shapes_.end()) return it->second.get();
    auto s = std::make_unique<LtShape>();
    s->lt = &api_;
    const cudaDataType_t type = CudaType(dtype);
    const auto i = static_cast<uint64_t>(in), o = static_cast<uint64_t>(out),
               n = static_cast<uint64_t>(tokens);
    for (auto [l, rows, cols] :
         {std::tuple{&s->w, o, i}, std::tuple{&s->x, i, n}, std::tuple{&s->y, o, n}}) {
      if (absl::Status st =
              Lt(api_, api_.MatrixLayoutCreate(l, type, rows, cols, static_cast<int64_t>(rows)),
                 "layout");
          !st.ok()) {
        return st;
      }
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    if (absl::Status st = Lt(api_,
                             api_.MatmulAlgoGetHeuristic(lt_, op_, s->w, s->x, s->y, s->y, pref_, 1,
                                                         &result, &found),
                             "cublasLtMatmulAlgoGetHeuristic");
        !st.ok()) {
      return st;
    }
    if (found == 0) {
      return absl::InternalError(absl::StrCat("cuBLASLt has no algorithm for the projection of ",
                                              tokens, " tokens of ", in, " to ", out, " features"));
    }
    s->algo = result.algo;
    return (shapes_[key] = std::move(s)).get();
  }

  const cuda::CublasLt& api_;
  const int device_;
  const cudaStream_t stream_;
  std::unique_ptr<attention::AttentionBackend> attention_;
  const std::string name_ = "cuda-cublaslt";
  cublasLtHandle_t lt_ = nullptr;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatmulPreference_t pref_ = nullptr;
  std::map<std::tuple<uint64_t, DType, int64_t>, std::shared_ptr<const DeviceWeights>> weights_;
  std::map<std::tuple<int64_t, int64_t, int64_t, DType>, std::unique_ptr<LtShape>> shapes_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<MultiheadBackend>> CreateCudaMultiheadBackend(
    const attention::CudaBackendOptions& options) {
  absl::StatusOr<std::unique_ptr<attention::AttentionBackend>> att =
      attention::CreateCudaBackend(options);
  if (!att.ok()) return att.status();
  absl::StatusOr<const cuda::CublasLt*> api = cuda::LoadCublasLt();
  if (!api.ok()) return api.status();
  auto b = std::make_unique<CudaMultiheadBackend>(
      *api, options.device, static_cast<cudaStream_t>(options.stream), *std::move(att));
  if (absl::Status s = b->Init(); !s.ok()) return s;
  return std::unique_ptr<MultiheadBackend>(std::move(b));
}

}  // namespace dilattn::multihead
