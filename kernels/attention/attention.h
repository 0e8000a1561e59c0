#pragma once

// Public interface of the dilated-attention kernels. Pure C++ (no CUDA types), so the server and
// the client build with the host compiler alone. Every entry point validates before any work and
// reports problems as absl::Status; nothing here throws or exits.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/attention/dtype.h"
#include "kernels/attention/params.h"
#include "kernels/common/device.h"

namespace dilattn::attention {

// The operator's options (DESIGN.md section 1).
struct AttentionOptions {
  Mode mode = Mode::kLongNet;
  std::vector<int64_t> segment_lengths;
  std::vector<int64_t> dilation_rates;
  bool causal = false;
  std::optional<double> softmax_scale;  // 1/sqrt(head_dim) when unset
};

// The shape of one call: sequences of possibly different lengths packed end to end without
// padding, each token a (num_heads, head_dim) row. A dense (B, N, H, D) tensor is B sequences of
// length N.
struct ProblemShape {
  DType dtype = DType::kFloat32;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  std::vector<int64_t> seq_lengths;
};

ProblemShape DenseShape(DType dtype, int64_t batch, int64_t seq_len, int64_t num_heads,
                        int64_t head_dim);

// "B=2, N=128, H=4, D=32, fp16" for dense shapes; packed ones list the sequence count instead.
std::string DescribeShape(const ProblemShape& shape);

absl::StatusOr<Mode> ParseMode(absl::string_view name);
absl::string_view ModeName(Mode mode);
absl::StatusOr<DType> ParseDType(absl::string_view name);  // "fp32" / "FP32" / "float32", ...

// A validated problem. Only PlanAttention() makes one, so a backend never sees an unchecked
// configuration. Pointer fields of `params` are filled in by the backend at run time.
struct AttentionPlan {
  AttentionOptions options;
  ProblemShape shape;
  DilatedAttentionParams params{};
  std::vector<int64_t> seq_offsets;  // [num_seqs + 1], host copy
  size_t tensor_bytes = 0;           // bytes of each of Q, K, V and O
  double flops = 0;                  // effective FLOPs by DESIGN.md's formula
};

// A softmax scale, when given, must be finite, > 0 as a float, and at most kMaxSoftmaxScale:
// scores are formed in fp32, and past that bound fp16 inputs could overflow them to inf (whose
// softmax is NaN). PlanAttention and the block-sparse planner both check it here.
inline constexpr double kMaxSoftmaxScale = 1e6;
absl::Status CheckSoftmaxScale(const std::optional<double>& scale);

// Every check of DESIGN.md section 1 except the backend's head-dim set; each failure is
// INVALID_ARGUMENT naming the field and its values.
absl::StatusOr<AttentionPlan> PlanAttention(const AttentionOptions& options,
                                            const ProblemShape& shape);

// Effective FLOPs of one branch over one head of a sequence of n tokens (DESIGN.md):
// 4 * n * w * D / r^2 with w = min(segment, n), halved with causal.
double BranchFlops(int64_t seq_len, int64_t segment_length, int64_t dilation_rate,
                   int64_t head_dim, bool causal);

// A run of whole token rows of a plan that is a problem of its own: every key its rows attend to
// lies inside it, and computed alone (as `shape`, on the tensors' rows from `row_begin`) it gives
// those rows exactly the plan's output. Its sequences are the plan's, whole or cut where no
// branch's segment crosses (multiples of every segment length from the sequence's start), so
// every segment, kept position and causal mask is the same relative to its sequence.
struct PlanPiece {
  int64_t row_begin = 0;
  int64_t row_end = 0;
  ProblemShape shape;
};

// The lcm of every branch's segment length, the step at which a sequence may be cut into
// problems of their own; 0 when it exceeds `limit`.
int64_t SegmentCutUnit(const DilatedAttentionParams& params, int64_t limit);

// Consecutive pieces covering the plan's rows, each of at most `target_rows` rows where a cut
// allows: long sequences are cut into equal lengths (the largest multiple of every segment length
// not above the target, so their pieces share one shape), short ones grouped. One piece when no
// cut exists (a segment as long as the sequence) or target_rows covers the plan.
std::vector<PlanPiece> SplitIntoPieces(const AttentionPlan& plan, int64_t target_rows);

struct ConstTensorRef {
  const void* data = nullptr;
  size_t bytes = 0;
  DeviceLoc location;
};

struct TensorRef {
  void* data = nullptr;
  size_t bytes = 0;
  DeviceLoc location;
};

struct AttentionTensors {
  ConstTensorRef q;  // (tokens, H, D)
  ConstTensorRef k;  // (tokens, H, D)
  ConstTensorRef v;  // (tokens, H, D)
  TensorRef o;       // (tokens, H, D)
};

// Byte counts match the plan and every buffer lives on `where`.
absl::Status CheckTensors(const AttentionPlan& plan, const AttentionTensors& tensors,
                          DeviceLoc where);

// A compute backend bound to one device. Not thread-safe: one engine thread owns each instance.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  virtual absl::string_view name() const = 0;
  virtual DeviceLoc location() const = 0;

  // OK exactly when Run() would accept the plan; otherwise INVALID_ARGUMENT naming the option the
  // backend cannot run. Decided by the same selector Run() uses.
  virtual absl::Status Supports(const AttentionPlan& plan) const = 0;

  // Scratch memory Run() needs for this plan, on location(); the caller leases it from a pool.
  virtual size_t WorkspaceBytes(const AttentionPlan& plan) const = 0;

  virtual absl::Status Run(const AttentionPlan& plan, const AttentionTensors& tensors,
                           TensorRef workspace) = 0;

  // Optional, for callers that overlap their copies with the computation of one plan whose rows
  // cannot be cut into independent problems (SplitIntoPieces): the plan's work as launches over
  // parts of the query rows, part i computing the tiles whose first row (counted over the batch)
  // lies in [cuts[i], cuts[i + 1]) (cuts ascending from 0 to total_tokens). After part i, output
  // rows below cuts[i + 1] are final; part i reads the Q rows below the returned q_ends[i] (which
  // ascend, each at least cuts[i + 1]), and K and V anywhere. RunPart(i) enqueues part i, parts in
  // order with the same tensors and workspace (WorkspaceBytes of the plan); PrepareParts must have
  // been called for the plan and cuts. UNIMPLEMENTED where the backend has no parts.
  virtual absl::StatusOr<std::vector<int64_t>> PrepareParts(const AttentionPlan& /*plan*/,
                                                            const std::vector<int64_t>& /*cuts*/) {
    return absl::UnimplementedError(absl::StrCat(name(), " runs a plan in one launch only"));
  }
  virtual absl::Status RunPart(const AttentionPlan& /*plan*/, const AttentionTensors& /*tensors*/,
                               TensorRef /*workspace*/, size_t /*part*/) {
    return absl::UnimplementedError(absl::StrCat(name(), " runs a plan in one launch only"));
  }
};

struct CpuBackendOptions {
  int num_threads = 0;       // 0: one per hardware thread
  std::string isa = "auto";  // "auto" (widest this CPU runs), "avx512", "avx2", "generic"
};

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuBackend(
    const CpuBackendOptions& options);

class GpuTileCache;  // gpu_tiles.h

struct CudaBackendOptions {
  int device = 0;
  void* stream = nullptr;  // a cudaStream_t; null is the legacy default stream
  // Tile lists of recent shapes, shared by the backends of one device (one of its own if null).
  std::shared_ptr<GpuTileCache> tile_cache;
};

// The fused GPU kernel. Run() enqueues on the backend's stream and returns: the caller orders
// later work (copies of O) after it on that stream. Tensors and workspace must be device memory
// of `device`; dtype fp16 or bf16. FAILED_PRECONDITION in a build without CUDA or without the
// device.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaBackend(
    const CudaBackendOptions& options);

}  // namespace dilattn::attention
