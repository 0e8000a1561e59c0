// The multihead module on a GPU: the four projections on cuBLASLt (fp16 / bf16 operands, fp32
// accumulation, the bias added in the epilogue), the fused dilated-attention kernel between them,
// the sub-layer norm as one small kernel. Host compiler; CUDA only through its runtime API.

#include <cuda_runtime_api.h>

#include <map>
#include <memory>
#include <tuple>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/attention/dtype.h"
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

// One set of weights on this device in one dtype: the four transposed projections and their
// biases in the dtype (cuBLASLt's bias takes the output's type), the norm's parameters in fp32.
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

// Uploads `w` in `dtype` to the current device.
absl::StatusOr<std::unique_ptr<DeviceWeights>> Upload(const MultiheadWeights& w, DType dtype) {
  auto d = std::make_unique<DeviceWeights>();
  const size_t e = static_cast<size_t>(w.embed_dim);
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
  const std::vector<float>* wts[4] = {&w.wt_q, &w.wt_k, &w.wt_v, &w.wt_out};
  const std::vector<float>* bs[4] = {&w.b_q, &w.b_k, &w.b_v, &w.b_out};
  for (int i = 0; i < 4; ++i) {
    if (absl::Status s = upload(*wts[i], &d->wt[i]); !s.ok()) return s;
    if (absl::Status s = upload(*bs[i], &d->bias[i]); !s.ok()) return s;
  }
  if (w.layer_norm) {
    for (auto [src, dst] :
         {std::pair{&w.ln_weight, &d->ln_weight}, std::pair{&w.ln_bias, &d->ln_bias}}) {
      if (absl::Status s =
              Cuda(cudaMalloc(reinterpret_cast<void**>(dst), e * sizeof(float)), "weights");
          !s.ok()) {
        return s;
      }
      if (absl::Status s =
              Cuda(cudaMemcpy(*dst, src->data(), e * sizeof(float), cudaMemcpyHostToDevice),
                   "weights upload");
          !s.ok()) {
        return s;
      }
    }
  }
  return d;
}

// The backends of one device (an executor has one per stream) share one upload of each set of
// weights in each dtype; it is freed when the last of them lets go.
absl::StatusOr<std::shared_ptr<const DeviceWeights>> SharedUpload(int device,
                                                                  const MultiheadWeights& w,
                                                                  DType dtype) {
  static absl::Mutex mu(absl::kConstInit);
  static auto* uploads ABSL_GUARDED_BY(mu) =
      new std::map<std::tuple<int, uint64_t, DType>, std::weak_ptr<const DeviceWeights>>();
  absl::MutexLock lock(&mu);
  std::weak_ptr<const DeviceWeights>& slot = (*uploads)[{device, w.id, dtype}];
  if (std::shared_ptr<const DeviceWeights> held = slot.lock()) return held;
  absl::StatusOr<std::unique_ptr<DeviceWeights>> made = Upload(w, dtype);
  if (!made.ok()) return made.status();
  std::shared_ptr<const DeviceWeights> held(*std::move(made));
  slot = held;
  return held;
}

// cuBLASLt's description of the projection over `tokens` rows, with the algorithm it chose.
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

  // The one selector: fp16 / bf16, an E whose rows keep cuBLASLt's and the attention kernel's
  // 16-byte alignment, and an attention the fused kernel runs.
  absl::Status Supports(const MultiheadPlan& plan) const override {
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
    return attention_->Supports(plan.attention);
  }

  size_t WorkspaceBytes(const MultiheadPlan& plan) const override {
    return OwnBytes(plan) + AlignUp(attention_->WorkspaceBytes(plan.attention));
  }

  absl::Status Run(const MultiheadPlan& plan, const MultiheadTensors& t,
                   attention::TensorRef workspace) override {
    if (absl::Status s = Supports(plan); !s.ok()) return s;
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
    if (workspace.bytes < OwnBytes(plan)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "workspace of ", workspace.bytes, " bytes; the plan needs ", WorkspaceBytes(plan)));
    }
    if (absl::Status s = Cuda(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    const DType dtype = plan.attention.shape.dtype;
    absl::StatusOr<const DeviceWeights*> w = Weights(*plan.weights, dtype);
    if (!w.ok()) return w.status();
    const int64_t tokens = plan.attention.params.total_tokens;
    absl::StatusOr<const LtShape*> shape = Shape(plan.weights->embed_dim, tokens, dtype);
    if (!shape.ok()) return shape.status();

    auto* base = static_cast<std::byte*>(workspace.data);
    const size_t step = AlignUp(plan.tensor_bytes);
    void* q = base;
    void* k = base + step;
    void* v = base + 2 * step;
    void* o = base + 3 * step;
    void* lt_ws = base + 4 * step;
    attention::TensorRef att_ws{base + OwnBytes(plan), workspace.bytes - OwnBytes(plan), here};
    auto project = [&](int which, const void* in, void* out) {
      return Project(**shape, (*w)->wt[which], (*w)->bias[which], in, out, lt_ws);
    };
    for (auto [which, out] : {std::pair{0, q}, std::pair{1, k}, std::pair{2, v}}) {
      if (absl::Status s = project(which, t.x.data, out); !s.ok()) return s;
    }
    const size_t bytes = plan.tensor_bytes;
    if (absl::Status s = attention_->Run(
            plan.attention,
            {{q, bytes, here}, {k, bytes, here}, {v, bytes, here}, {o, bytes, here}}, att_ws);
        !s.ok()) {
      return s;
    }
    if (plan.weights->layer_norm) {
      if (absl::Status s =
              Cuda(static_cast<cudaError_t>(cuda::LaunchLayerNorm(
                       o, tokens, plan.weights->embed_dim, dtype, (*w)->ln_weight, (*w)->ln_bias,
                       static_cast<float>(plan.weights->layer_norm_eps), stream_)),
                   "layer norm");
          !s.ok()) {
        return s;
      }
    }
    return project(3, o, t.y.data);
  }

 private:
  // The module's part of the workspace, ahead of the attention's: Q, K, V, the attention's output
  // and cuBLASLt's scratch.
  static size_t OwnBytes(const MultiheadPlan& plan) {
    return 4 * AlignUp(plan.tensor_bytes) + kLtWorkspace;
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
    // Column-major view: Y^T (E, tokens) = W (E, E) . X^T (E, tokens), W being wt read
    // column-major.
    return Lt(api_,
              api_.Matmul(lt_, op_, &alpha, wt, shape.w, in, shape.x, &beta, out, shape.y, out,
                          shape.y, &shape.algo, lt_ws, kLtWorkspace, stream_),
              "cublasLtMatmul");
  }

  absl::StatusOr<const DeviceWeights*> Weights(const MultiheadWeights& w, DType dtype) {
    auto key = std::make_pair(w.id, dtype);
    if (auto it = weights_.find(key); it != weights_.end()) return it->second.get();
    absl::StatusOr<std::shared_ptr<const DeviceWeights>> shared = SharedUpload(device_, w, dtype);
    if (!shared.ok()) return shared.status();
    return (weights_[key] = *std::move(shared)).get();
  }

  absl::StatusOr<const LtShape*> Shape(int64_t e, int64_t tokens, DType dtype) {
    auto key = std::make_tuple(e, tokens, dtype);
    if (auto it = shapes_.find(key); it != shapes_.end()) return it->second.get();
    // Batches of many lengths would grow this without bound; the descriptions are cheap to remake.
    if (shapes_.size() >= 64) shapes_.clear();
    auto s = std::make_unique<LtShape>();
    s->lt = &api_;
    const cudaDataType_t type = CudaType(dtype);
    const auto u = static_cast<uint64_t>(e), n = static_cast<uint64_t>(tokens);
    if (absl::Status st =
            Lt(api_, api_.MatrixLayoutCreate(&s->w, type, u, u, static_cast<int64_t>(u)), "layout");
        !st.ok()) {
      return st;
    }
    for (cublasLtMatrixLayout_t* l : {&s->x, &s->y}) {
      if (absl::Status st =
              Lt(api_, api_.MatrixLayoutCreate(l, type, u, n, static_cast<int64_t>(u)), "layout");
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
                                              tokens, " tokens of E=", e));
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
  std::map<std::pair<uint64_t, DType>, std::shared_ptr<const DeviceWeights>> weights_;
  std::map<std::tuple<int64_t, int64_t, DType>, std::unique_ptr<LtShape>> shapes_;
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
