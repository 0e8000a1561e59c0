#pragma once

// The multihead module (DESIGN.md section 1): hidden states X (B, N, E) -> Q, K, V projections ->
// dilated attention over H heads of D = E / H -> optional sub-layer norm -> output projection
// Y (B, N, E). Weights are loaded once from a safetensors file under the names torchscale's
// MultiheadAttention / DilatedAttention use (q_proj, k_proj, v_proj, out_proj, inner_attn_ln);
// dilated-attention-pytorch's `norm` is accepted for the sub-layer norm. Pure C++ header: the
// server builds against it with the host compiler.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention/attention.h"
#include "kernels/multihead/safetensors.h"

namespace dilattn::multihead {

struct WeightsOptions {
  int64_t num_heads = 0;         // E % num_heads == 0
  std::string prefix;            // prepended to every tensor name ("layers.0.self_attn.")
  double layer_norm_eps = 1e-5;  // the sub-layer norm's epsilon, when the file has one
};

// fp32 host copy of the weights. Projections are stored transposed, (E_in, E_out) row-major, so
// y = x W^T + b is x . wt + b with contiguous output columns (the CPU kernel's vector direction;
// cuBLAS takes the same buffer as a column-major W).
struct MultiheadWeights {
  int64_t embed_dim = 0;
  int64_t num_heads = 0;
  std::vector<float> wt_q, wt_k, wt_v, wt_out;  // (E, E) each, transposed
  std::vector<float> b_q, b_k, b_v, b_out;      // (E) each; zeros where the file has no bias
  bool layer_norm = false;
  std::vector<float> ln_weight, ln_bias;  // (E) each; ones / zeros where the file has none
  double layer_norm_eps = 1e-5;
  std::string source;  // the file, for messages
  uint64_t id = 0;     // process-unique: device backends key their uploaded copies by it
};

absl::StatusOr<std::shared_ptr<const MultiheadWeights>> LoadWeights(const SafetensorsFile& file,
                                                                    const WeightsOptions& options);
absl::StatusOr<std::shared_ptr<const MultiheadWeights>> LoadWeightsFile(
    const std::string& path, const WeightsOptions& options);

// A validated call: the attention between the projections is planned on `shape`, whose
// num_heads and head_dim must be the weights' H and E / H.
struct MultiheadPlan {
  attention::AttentionPlan attention;  // in the dtype of X and Y
  std::shared_ptr<const MultiheadWeights> weights;
  size_t tensor_bytes = 0;  // of X and of Y: tokens x E elements
  double flops = 0;         // the four projections plus the attention's effective FLOPs
};

absl::StatusOr<MultiheadPlan> PlanMultihead(std::shared_ptr<const MultiheadWeights> weights,
                                            const attention::AttentionOptions& options,
                                            const attention::ProblemShape& shape);

struct MultiheadTensors {
  attention::ConstTensorRef x;  // (tokens, E)
  attention::TensorRef y;       // (tokens, E)
};

class MultiheadBackend {
 public:
  virtual ~MultiheadBackend() = default;
  virtual absl::string_view name() const = 0;
  virtual DeviceLoc location() const = 0;
  // OK exactly when Run() would accept the plan (the same selector).
  virtual absl::Status Supports(const MultiheadPlan& plan) const = 0;
  // Whether the backend runs the plan's attention at a padded head dim (the GPU's, for a head dim
  // without a kernel), by the same selector.
  virtual bool RunsPadded(const MultiheadPlan&) const { return false; }
  virtual size_t WorkspaceBytes(const MultiheadPlan& plan) const = 0;
  // X and Y may not overlap. On a GPU, enqueues on the backend's stream and returns.
  virtual absl::Status Run(const MultiheadPlan& plan, const MultiheadTensors& tensors,
                           attention::TensorRef workspace) = 0;
};

// fp32 arithmetic for every dtype (X widened, Y rounded once at the end). The attention runs on
// `attention`, a CPU attention backend that outlives this one and is used from the same thread
// (an executor's own, so that its threads are not duplicated); null makes one.
absl::StatusOr<std::unique_ptr<MultiheadBackend>> CreateCpuMultiheadBackend(
    const attention::CpuBackendOptions& options, attention::AttentionBackend* attention = nullptr);

// cuBLAS projections (fp32 accumulation) around the fused attention kernel, in fp16 or bf16.
// Each set of weights is uploaded once per backend, in the dtype it is first run with.
// FAILED_PRECONDITION in a build without CUDA or without the device.
absl::StatusOr<std::unique_ptr<MultiheadBackend>> CreateCudaMultiheadBackend(
    const attention::CudaBackendOptions& options);

// The module evaluated in float64 (projections, norm, the attention reference). What a backend
// stores between its steps is rounded to `storage`: the weights and Q, K, V, the attention's output
// and the normed output. kFloat32 is the CPU path's storage and the definition to within fp32;
// the GPU path stores in the dtype of X, and comparing it against a reference that rounds at
// the same points isolates its arithmetic from the storage precision. Host memory.
absl::Status ReferenceMultihead(const MultiheadPlan& plan, const MultiheadTensors& tensors,
                                attention::DType storage = attention::DType::kFloat32);

}  // namespace dilattn::multihead
