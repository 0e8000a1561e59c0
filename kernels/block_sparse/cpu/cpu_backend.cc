// CPU block-sparse attention on the shared tile kernel: one task per (sequence, head, query
// block, 64 queries), with one key span per selected key block, so a query's softmax runs over
// all its blocks at once and skipped block pairs cost nothing.

#include <algorithm>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention/cpu/tile_runner.h"
#include "kernels/block_sparse/block_sparse.h"

namespace dilattn::block_sparse {
namespace {

using attention::cpu::KeySpan;
using attention::cpu::kTileQ;
using attention::cpu::TileContext;
using attention::cpu::TileParams;
using attention::cpu::TileTask;

constexpr int kMaxCpuHeadDim = 256;
// Tasks (32 bytes each) are listed per (sequence, head, query block, 64 rows): block_size 1 makes
// one per token and head, gigabytes of list for a problem whose tensors are a few hundred MB.
constexpr int64_t kMaxTasks = int64_t{1} << 26;
// Lists longer than this are freed after their run rather than kept for the next.
constexpr size_t kKeptListEntries = size_t{1} << 20;

// The tasks Run lists for `plan`.
int64_t CountTasks(const BlockSparsePlan& plan) {
  const int64_t bs = plan.options.block_size;
  const auto tiles = [](int64_t rows) { return (rows + kTileQ - 1) / kTileQ; };
  int64_t tasks = 0;
  for (size_t s = 0; s < plan.seq_layout.size(); ++s) {
    const int64_t n = plan.seq_offsets[s + 1] - plan.seq_offsets[s];
    tasks += plan.shape.num_heads * ((n / bs) * tiles(bs) + tiles(n % bs));
    if (tasks > kMaxTasks) return tasks;
  }
  return tasks;
}

class CpuBlockSparseBackend final : public BlockSparseBackend {
 public:
  explicit CpuBlockSparseBackend(std::unique_ptr<attention::cpu::TileRunner> runner)
      : runner_(std::move(runner)), name_(absl::StrCat("cpu-", runner_->isa())) {}

  absl::string_view name() const override { return name_; }
  DeviceLoc location() const override { return DeviceLoc::Host(); }

  absl::Status Supports(const BlockSparsePlan& plan) const override {
    if (plan.shape.head_dim > kMaxCpuHeadDim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "head_dim D=", plan.shape.head_dim, " is not supported by the cpu backend (1..",
          kMaxCpuHeadDim, ")"));
    }
    if (CountTasks(plan) > kMaxTasks) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block_size ", plan.options.block_size, " over ", plan.shape.num_heads,
          " heads makes more than ", kMaxTasks,
          " (sequence, head, query block) tasks, more than the cpu backend lists; use larger "
          "blocks"));
    }
    return absl::OkStatus();
  }

  size_t WorkspaceBytes(const BlockSparsePlan& plan) const override {
    return runner_->ScratchBytes(static_cast<int>(plan.shape.head_dim));
  }

  absl::Status Run(const BlockSparsePlan& plan, const attention::AttentionTensors& tensors,
                   attention::TensorRef workspace) override {
    if (absl::Status s = Supports(plan); !s.ok()) return s;
    if (absl::Status s = CheckBlockSparseTensors(plan, tensors, DeviceLoc::Host()); !s.ok()) {
      return s;
    }
    if (workspace.bytes < WorkspaceBytes(plan) || workspace.data == nullptr ||
        !workspace.location.is_host()) {
      return absl::InvalidArgumentError(absl::StrCat("cpu workspace too small: ",
                                                     workspace.bytes, " bytes, need ",
                                                     WorkspaceBytes(plan)));
    }
    const int64_t heads = plan.shape.num_heads;
    const int64_t dim = plan.shape.head_dim;
    const int64_t row = heads * dim;
    const TileParams tp{tensors.q.data, tensors.k.data, tensors.v.data, tensors.o.data,
                        row, row, row, row, static_cast<int32_t>(heads),
                        static_cast<int32_t>(dim), plan.shape.dtype, plan.options.causal,
                        plan.scale};
    const int64_t bs = plan.options.block_size;
    tasks_.clear();
    spans_.clear();
    for (size_t s = 0; s < plan.seq_layout.size(); ++s) {
      const BlockLayout& layout = plan.layouts[static_cast<size_t>(plan.seq_layout[s])];
      const int64_t base = plan.seq_offsets[s];
      for (int64_t i = 0; i < layout.num_blocks; ++i) {
        const int32_t span_begin = static_cast<int32_t>(spans_.size());
        for (int64_t c = layout.row_begin[i]; c < layout.row_begin[i + 1]; ++c) {
          const int64_t j = layout.cols[static_cast<size_t>(c)];
          spans_.push_back(KeySpan{base + j * bs, std::min(bs, layout.seq_len - j * bs)});
        }
        const int32_t span_count = static_cast<int32_t>(spans_.size()) - span_begin;
        const int64_t q_len = std::min(bs, layout.seq_len - i * bs);
        for (int32_t h = 0; h < heads; ++h) {
          // A block with no keys still gets its tasks: they write its rows as zeros.
          for (int64_t q0 = 0; q0 < q_len; q0 += kTileQ) {
            tasks_.push_back(TileTask{base + i * bs + q0, 1, h,
                                      static_cast<int32_t>(std::min<int64_t>(kTileQ, q_len - q0)),
                                      span_begin, span_count});
          }
        }
      }
    }
    runner_->Run(TileContext{&tp, spans_.data(), {}, /*fresh=*/true, /*final=*/true}, tasks_,
                 workspace.data);
    // Kept for the next run only while small: one huge problem must not hold its lists for good.
    if (tasks_.capacity() > kKeptListEntries) tasks_ = {};
    if (spans_.capacity() > kKeptListEntries) spans_ = {};
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<attention::cpu::TileRunner> runner_;
  std::string name_;
  std::vector<TileTask> tasks_;
  std::vector<KeySpan> spans_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BlockSparseBackend>> CreateCpuBlockSparseBackend(
    const attention::CpuBackendOptions& options) {
  absl::StatusOr<std::unique_ptr<attention::cpu::TileRunner>> runner =
      attention::cpu::TileRunner::Create(options.num_threads, options.isa);
  if (!runner.ok()) return runner.status();
  return std::unique_ptr<BlockSparseBackend>(new CpuBlockSparseBackend(*std::move(runner)));
}

}  // namespace dilattn::block_sparse
