#pragma once

// Block-sparse attention (DESIGN.md section 1): the sequence is cut into blocks of block_size
// tokens and a pattern says which key blocks each query block attends to; a query takes one
// softmax over all keys of all its selected blocks. Causal masking compares token positions,
// across blocks too. A query row with no key left outputs 0. Same tensor layout as dilated
// attention: sequences packed end to end, each token a (num_heads, head_dim) row.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/attention/attention.h"

namespace dilattn::block_sparse {

enum class Pattern : uint8_t {
  kLocalWindow,    // |i - j| <= window
  kDilatedSparse,  // j == i or |i - j| == r for a configured rate r
  kGlobalLocal,    // the first global_blocks attend to all and are attended by all, plus window
  kStrided,        // (i - j) % stride == 0
  kRandom,         // each pair kept with probability density (seeded, deterministic), diagonal kept
  kExplicit,       // the caller's (i, j) pairs
};

absl::StatusOr<Pattern> ParsePattern(absl::string_view name);
absl::string_view PatternName(Pattern pattern);

struct BlockSparseOptions {
  int64_t block_size = 64;
  Pattern pattern = Pattern::kLocalWindow;
  int64_t window = 1;                 // local_window, global_local
  std::vector<int64_t> rates;         // dilated_sparse
  int64_t global_blocks = 0;          // global_local
  int64_t stride = 0;                 // strided
  double density = 0;                 // random
  uint64_t seed = 0;                  // random
  std::vector<std::pair<int64_t, int64_t>> pairs;  // explicit (query block, key block)
  bool causal = false;
  std::optional<double> softmax_scale;  // 1/sqrt(head_dim) when unset
};

// Whether the pattern (causal aside) keeps key block j for query block i of a sequence of
// num_blocks blocks. The random pattern keeps (i, j) when the top 53 bits of
// mix(seed ^ mix(i << 32 | j)), with mix SplitMix64's output function, read as a fraction of
// 2^53, are below density: the same answer on every run and backend.
bool PairKept(const BlockSparseOptions& options, int64_t i, int64_t j, int64_t num_blocks);

// Selected key blocks of every query block of one sequence length, causal already applied.
struct BlockLayout {
  int64_t seq_len = 0;
  int64_t num_blocks = 0;
  std::vector<int64_t> row_begin;  // [num_blocks + 1] into cols
  std::vector<int32_t> cols;       // ascending key blocks per query block
};

struct BlockSparsePlan {
  BlockSparseOptions options;
  attention::ProblemShape shape;
  std::vector<int64_t> seq_offsets;  // [num_seqs + 1]
  std::vector<BlockLayout> layouts;  // one per distinct sequence length
  std::vector<int32_t> seq_layout;   // layout index of each sequence
  size_t tensor_bytes = 0;
  float scale = 0;
  // Sizes, strides, dtype, causal and scale as the GPU kernels take them (pointers unset; the
  // branch fields are a stand-in branch of the block size, unused).
  attention::DilatedAttentionParams params{};
  double flops = 0;          // 4 * D per visible (query, key) pair and head
  int64_t kept_pairs = 0;    // (query block, key block) pairs over all sequences, per head
};

// The most kept (query block, key block) pairs a plan may hold, summed over its sequences (a
// sequence's layout counts once per sequence of that length): the backends list a key span per
// kept pair of every sequence. A scheduler that batches requests keeps their sum within it.
inline constexpr int64_t kMaxKeptPairs = int64_t{1} << 26;

// Every check, each failure INVALID_ARGUMENT naming the field and its values.
absl::StatusOr<BlockSparsePlan> PlanBlockSparse(const BlockSparseOptions& options,
                                                const attention::ProblemShape& shape);

// Bounds the process-wide cache of the layouts PlanBlockSparse builds (64 MiB; least recently
// used go first) and returns the previous bound. 0 keeps none, so that every plan builds its
// layouts afresh. For tests: a small bound makes the cache evict all the time.
size_t SetLayoutCacheBytesForTesting(size_t max_bytes);

// attention::CheckTensors for a block-sparse plan: byte counts match and every buffer is on
// `where`.
absl::Status CheckBlockSparseTensors(const BlockSparsePlan& plan,
                                     const attention::AttentionTensors& tensors, DeviceLoc where);

class BlockSparseBackend {
 public:
  virtual ~BlockSparseBackend() = default;
  virtual absl::string_view name() const = 0;
  virtual DeviceLoc location() const = 0;
  virtual absl::Status Supports(const BlockSparsePlan& plan) const = 0;
  virtual size_t WorkspaceBytes(const BlockSparsePlan& plan) const = 0;
  virtual absl::Status Run(const BlockSparsePlan& plan, const attention::AttentionTensors& tensors,
                           attention::TensorRef workspace) = 0;
};

absl::StatusOr<std::unique_ptr<BlockSparseBackend>> CreateCpuBlockSparseBackend(
    const attention::CpuBackendOptions& options);

// The fused GPU kernels over the pattern's key runs (fp16 and bf16; the head dims
// cuda::BlockSparseSupportsHeadDim lists). Run() enqueues on the options' stream and returns.
// FAILED_PRECONDITION in a build without CUDA or without the device.
absl::StatusOr<std::unique_ptr<BlockSparseBackend>> CreateCudaBlockSparseBackend(
    const attention::CudaBackendOptions& options);

// Float64, one explicit softmax per query over its visible keys. Host memory only.
absl::Status ReferenceBlockSparse(const BlockSparsePlan& plan,
                                  const attention::AttentionTensors& tensors);

}  // namespace dilattn::block_sparse
