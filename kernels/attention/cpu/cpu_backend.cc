// The multithreaded CPU backend for dilated attention. Work is cut into tiles of kept queries
// (tile_kernel.h) and spread over the thread pool. longnet mode runs one pass per branch over a
// running softmax state per (token, head) row, so branches share a single softmax without a merge
// step; head_groups mode and single-branch problems need no state and run as one pass writing the
// output directly.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cpu/tile_runner.h"
#include "kernels/attention/tile_spans.h"

namespace dilattn::attention {
namespace {

using cpu::KeySpan;
using cpu::kScratchAlign;
using cpu::kTileQ;
using cpu::RowState;
using cpu::TileContext;
using cpu::TileParams;
using cpu::TileTask;

constexpr int kMaxCpuHeadDim = 256;
constexpr int64_t kTokensPerChunk = 256;  // rows per item of the element-wise passes

size_t AlignUp(size_t x) { return (x + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

// Floating-point operations a thread should have before another is woken for a job: waking one
// costs tens of microseconds on a virtual machine, and a batch of a few 64-token sequences (about
// 3 MFLOP each under the default branches) ran no faster on two threads than on one (230 us on
// the development machine) and a lone one took 207 us on two against 57 on one.
constexpr double kFlopsPerThread = 8e6;

// How a plan runs on the CPU. The one selector: Supports(), WorkspaceBytes() and Run() all ask it.
// O's rows [begin, end) = acc / l, in O's type as a template argument, so that the type is not
// decided per element and the fp32 loop vectorises (O may be the accumulator itself).
template <DType kType>
void NormaliseRows(const cpu::RowState& state, int64_t begin, int64_t end, int64_t dim, void* o) {
  for (int64_t row = begin; row < end; ++row) {
    const float inv = state.l[row] > 0 ? 1.0f / state.l[row] : 0.0f;
    const float* acc = state.acc + row * dim;
    for (int64_t d = 0; d < dim; ++d) {
      StoreFromFloat(o, kType, static_cast<size_t>(row * dim + d), acc[d] * inv);
    }
  }
}

struct CpuStrategy {
  bool multi_pass;     // longnet with several branches: running state across passes
  bool acc_in_output;  // the fp32 output doubles as the state's accumulator
  bool zero_output;    // single pass that may leave (position, head) rows uncovered
};

absl::StatusOr<CpuStrategy> SelectStrategy(const AttentionPlan& plan) {
  const DilatedAttentionParams& p = plan.params;
  if (p.head_dim > kMaxCpuHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim D=", p.head_dim,
                                                   " is not supported by the cpu backend (1..",
                                                   kMaxCpuHeadDim, ")"));
  }
  // The host lists a key span (16 bytes) and at least one task (32) per (sequence, head,
  // segment) of each branch, indexed in 32 bits (TileTask::span_begin): tiny segments over a
  // huge problem would take gigabytes for the lists, or wrap that index.
  constexpr int64_t kMaxSpans = int64_t{1} << 26;
  int64_t spans = 0;
  for (int b = 0; b < p.num_branches; ++b) {
    const int64_t heads = p.mode == Mode::kHeadGroups
                              ? p.group_head_begin[b + 1] - p.group_head_begin[b]
                              : p.num_heads;
    for (int64_t seq = 0; seq < p.num_seqs; ++seq) {
      const int64_t n = plan.seq_offsets[seq + 1] - plan.seq_offsets[seq];
      const int64_t w = std::min(p.segment_length[b], n);
      if (w > 0) spans += heads * ((n + w - 1) / w);
    }
    if (spans > kMaxSpans) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the branches' segments make more than ", kMaxSpans,
          " (sequence, head, segment) spans, more than the cpu backend lists; use longer "
          "segments"));
    }
  }
  CpuStrategy s{};
  s.multi_pass = p.mode == Mode::kLongNet && p.num_branches > 1;
  s.acc_in_output = p.dtype == DType::kFloat32 &&
                    p.o_row_stride == static_cast<int64_t>(p.num_heads) * p.head_dim;
  for (int i = 0; i < p.num_branches; ++i) s.zero_output |= p.dilation_rate[i] > 1;
  return s;
}

struct WorkspaceLayout {
  size_t m_offset = 0, l_offset = 0, acc_offset = 0;
  size_t total = 0;
};

WorkspaceLayout Layout(const AttentionPlan& plan, const CpuStrategy& s, size_t scratch_bytes) {
  const DilatedAttentionParams& p = plan.params;
  WorkspaceLayout w;
  size_t at = AlignUp(scratch_bytes);
  if (s.multi_pass) {
    const size_t rows = static_cast<size_t>(p.total_tokens) * static_cast<size_t>(p.num_heads);
    w.m_offset = at;
    at += AlignUp(rows * sizeof(float));
    w.l_offset = at;
    at += AlignUp(rows * sizeof(float));
    if (!s.acc_in_output) {
      w.acc_offset = at;
      at += AlignUp(rows * static_cast<size_t>(p.head_dim) * sizeof(float));
    }
  }
  w.total = at;
  return w;
}

class CpuBackend final : public AttentionBackend {
 public:
  explicit CpuBackend(std::unique_ptr<cpu::TileRunner> runner)
      : runner_(std::move(runner)), name_(absl::StrCat("cpu-", runner_->isa())) {}

  absl::string_view name() const override { return name_; }
  DeviceLoc location() const override { return DeviceLoc::Host(); }

  absl::Status Supports(const AttentionPlan& plan) const override {
    return SelectStrategy(plan).status();
  }

  size_t WorkspaceBytes(const AttentionPlan& plan) const override {
    absl::StatusOr<CpuStrategy> s = SelectStrategy(plan);
    return s.ok() ? Layout(plan, *s, runner_->ScratchBytes(plan.params.head_dim)).total : 0;
  }

  absl::Status Run(const AttentionPlan& plan, const AttentionTensors& tensors,
                   TensorRef workspace) override;

 private:
  // Appends the tiles (and their key spans) of `branch` over the heads that use it.
  void AddTasks(const AttentionPlan& plan, int branch);

  std::unique_ptr<cpu::TileRunner> runner_;
  std::string name_;
  std::vector<TileTask> tasks_;  // reused across runs
  std::vector<KeySpan> spans_;
};

void CpuBackend::AddTasks(const AttentionPlan& plan, int branch) {
  const DilatedAttentionParams& p = plan.params;
  // Clamped, as the GPU planner's: a rate past every position keeps one per segment, and the
  // spans' arithmetic below stays within int64.
  const int64_t rate = ClampedRate<int64_t>(p, branch);
  int head_begin = 0;
  int head_end = p.num_heads;
  if (p.mode == Mode::kHeadGroups) {
    head_begin = p.group_head_begin[branch];
    head_end = p.group_head_begin[branch + 1];
  }
  for (int64_t seq = 0; seq < p.num_seqs; ++seq) {
    const int64_t base = plan.seq_offsets[seq];
    const int64_t n = plan.seq_offsets[seq + 1] - base;
    const int64_t w = std::min(p.segment_length[branch], n);
    for (int head = head_begin; head < head_end; ++head) {
      const int64_t offset =
          p.mode == Mode::kLongNet ? head / p.offset_divisor[branch] : branch % rate;
      for (int64_t start = 0; start < n; start += w) {
        const int64_t length = std::min(w, n - start);
        if (offset >= length) continue;  // a short last segment may keep nothing
        const int64_t kept = (length - offset + rate - 1) / rate;
        const int64_t first_row = base + start + offset;
        const int32_t span = static_cast<int32_t>(spans_.size());
        spans_.push_back(KeySpan{first_row, kept});
        // A lone kept position has no stride; the tile kernel still steps its padded rows by
        // it, which a rate past every position would overflow.
        const int64_t stride = kept > 1 ? rate : 1;
        for (int64_t q0 = 0; q0 < kept; q0 += kTileQ) {
          tasks_.push_back(TileTask{first_row + q0 * rate, stride, head,
                                    static_cast<int32_t>(std::min<int64_t>(kTileQ, kept - q0)),
                                    span, 1});
        }
      }
    }
  }
}

absl::Status CpuBackend::Run(const AttentionPlan& plan, const AttentionTensors& tensors,
                             TensorRef workspace) {
  absl::StatusOr<CpuStrategy> strategy = SelectStrategy(plan);
  if (!strategy.ok()) return strategy.status();
  if (absl::Status s = CheckTensors(plan, tensors, DeviceLoc::Host()); !s.ok()) return s;
  const DilatedAttentionParams& p = plan.params;
  const size_t scratch_bytes = runner_->ScratchBytes(p.head_dim);
  const WorkspaceLayout layout = Layout(plan, *strategy, scratch_bytes);
  if (workspace.bytes < layout.total || !workspace.location.is_host() ||
      workspace.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cpu workspace too small or not in host memory: ", workspace.bytes, " bytes on ",
        workspace.location.ToString(), ", need ", layout.total));
  }
  if (reinterpret_cast<uintptr_t>(workspace.data) % kScratchAlign != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu workspace must be ", kScratchAlign, "-byte aligned"));
  }

  const TileParams tp{tensors.q.data, tensors.k.data, tensors.v.data, tensors.o.data,
                      p.q_row_stride, p.k_row_stride, p.v_row_stride, p.o_row_stride,
                      p.num_heads,    p.head_dim,     p.dtype,        p.causal,
                      p.scale};
  std::byte* ws = static_cast<std::byte*>(workspace.data);
  void* scratch = ws;
  const int64_t heads = p.num_heads;
  const int64_t dim = p.head_dim;
  const int64_t chunks = (p.total_tokens + kTokensPerChunk - 1) / kTokensPerChunk;
  auto chunk_rows = [&](int64_t chunk) {
    const int64_t begin = chunk * kTokensPerChunk;
    return std::pair<int64_t, int64_t>(begin * heads,
                                       std::min(begin + kTokensPerChunk, p.total_tokens) * heads);
  };
  cpu::ThreadPool& pool = runner_->pool();
  const cpu::ThreadPool::ScopedLimit limit(
      pool, static_cast<int>(std::min<double>(pool.size(), plan.flops / kFlopsPerThread)));

  if (!strategy->multi_pass) {
    if (strategy->zero_output) {
      const size_t row_bytes = static_cast<size_t>(dim) * DTypeSize(p.dtype);
      pool.ParallelFor(chunks, [&](int64_t c, int) {
        auto [begin, end] = chunk_rows(c);
        std::memset(static_cast<std::byte*>(tensors.o.data) + static_cast<size_t>(begin) * row_bytes,
                    0, static_cast<size_t>(end - begin) * row_bytes);
      });
    }
    tasks_.clear();
    spans_.clear();
    for (int b = 0; b < p.num_branches; ++b) AddTasks(plan, b);
    runner_->Run(TileContext{&tp, spans_.data(), RowState{}, /*fresh=*/true, /*final=*/true},
                 tasks_, scratch);
    return absl::OkStatus();
  }

  RowState state{strategy->acc_in_output ? static_cast<float*>(tensors.o.data)
                                         : reinterpret_cast<float*>(ws + layout.acc_offset),
                 reinterpret_cast<float*>(ws + layout.m_offset),
                 reinterpret_cast<float*>(ws + layout.l_offset)};
  pool.ParallelFor(chunks, [&](int64_t c, int) {
    auto [begin, end] = chunk_rows(c);
    std::fill(state.m + begin, state.m + end, -std::numeric_limits<float>::infinity());
    std::fill(state.l + begin, state.l + end, 0.0f);
    std::fill(state.acc + begin * dim, state.acc + end * dim, 0.0f);
  });
  for (int b = 0; b < p.num_branches; ++b) {
    tasks_.clear();
    spans_.clear();
    AddTasks(plan, b);
    runner_->Run(TileContext{&tp, spans_.data(), state, /*fresh=*/false, /*final=*/false},
                 tasks_, scratch);
  }
  pool.ParallelFor(chunks, [&](int64_t c, int) {
    auto [begin, end] = chunk_rows(c);
    switch (p.dtype) {
      case DType::kFloat32:
        return NormaliseRows<DType::kFloat32>(state, begin, end, dim, tensors.o.data);
      case DType::kFloat16:
        return NormaliseRows<DType::kFloat16>(state, begin, end, dim, tensors.o.data);
      case DType::kBFloat16:
        return NormaliseRows<DType::kBFloat16>(state, begin, end, dim, tensors.o.data);
    }
  });
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuBackend(
    const CpuBackendOptions& options) {
  absl::StatusOr<std::unique_ptr<cpu::TileRunner>> runner =
      cpu::TileRunner::Create(options.num_threads, options.isa);
  if (!runner.ok()) return runner.status();
  return std::unique_ptr<AttentionBackend>(new CpuBackend(*std::move(runner)));
}

}  // namespace dilattn::attention
