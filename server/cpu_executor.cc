// The CPU executor: one request runs straight on its message's memory where the kernels can take
// it as it is; otherwise, and for several requests, the tensors are packed into leased host
// buffers. Tensors in system shared memory are always copied in and out (through CopyGuarded:
// the client may shrink the object under the mapping). Start() does the whole job; Wait() has
// nothing left to wait for.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/attention/cpu/tile_runner.h"
#include "kernels/common/clock.h"
#include "kernels/memory/allocator.h"
#include "server/executor.h"

namespace dilattn::server {
namespace {

class CpuExecutor final : public Executor {
 public:
  CpuExecutor(const ExecutorOptions& options, std::unique_ptr<attention::AttentionBackend> dilated,
              std::unique_ptr<block_sparse::BlockSparseBackend> sparse,
              std::unique_ptr<multihead::MultiheadBackend> multihead,
              std::shared_ptr<memory::BufferPool> pool)
      : options_(options),
        dilated_(std::move(dilated)),
        sparse_(std::move(sparse)),
        multihead_(std::move(multihead)),
        pool_(std::move(pool)) {}

  std::string name() const override { return std::string(dilated_->name()); }
  std::vector<const memory::BufferPool*> pools() const override { return {pool_.get()}; }
  memory::BufferPool& staging_pool() override { return *pool_; }

  absl::StatusOr<PlanFacts> Supports(const InferenceRequest& r) const override {
    if (r.touches_device_memory()) {
      return absl::InvalidArgumentError(
          "a tensor is in CUDA shared memory, but this request runs on the CPU (the server has "
          "no GPU, or no GPU kernel covers the model's operator and shape): use system shared "
          "memory or send the tensors in the message");
    }
    const JobPlans plans = PlanOperator(
        r.options, attention::DenseShape(r.dtype, r.batch, r.seq_len, r.heads, r.head_dim));
    if (absl::Status s = plans.status(r.options.kind); !s.ok()) return s;
    absl::Status s = absl::InternalError("unknown operator");
    switch (r.options.kind) {
      case OperatorKind::kDilatedAttention:
        s = dilated_->Supports(*plans.dilated);
        break;
      case OperatorKind::kBlockSparse:
        s = sparse_->Supports(*plans.sparse);
        break;
      case OperatorKind::kMultihead:
        s = multihead_->Supports(*plans.multihead);
        break;
    }
    if (!s.ok()) return s;
    return plans.facts(r.options.kind);
  }

  absl::Status Start(Job& job) override { return RunOnHost(job); }
  absl::Status Wait(Job&) override { return absl::OkStatus(); }

  size_t ReleaseIdleMemory(absl::Time cutoff) override { return pool_->ReleaseIdle(cutoff); }

  // Also the CUDA executor's path for what its GPU kernels do not cover.
  absl::Status RunOnHost(Job& job) {
    job.on_host = true;
    job.path = ExecutionPath::kCpu;
    WaitForInputs(job);
    const absl::Time deadline = job.pool_deadline(options_.pool_wait);
    if (absl::Status s = StageHostSharedMemory(job, *pool_, /*pinned_too=*/true, deadline);
        !s.ok()) {
      return s;
    }
    JobPlans plans = PlanJob(job, job.shape.dtype);
    const OperatorKind kind = job.requests.front()->options.kind;
    if (absl::Status s = plans.status(kind); !s.ok()) return s;
    size_t bytes = 0, ws_bytes = 0;
    switch (kind) {
      case OperatorKind::kDilatedAttention:
        bytes = plans.dilated->tensor_bytes;
        ws_bytes = dilated_->WorkspaceBytes(*plans.dilated);
        break;
      case OperatorKind::kBlockSparse:
        bytes = plans.sparse->tensor_bytes;
        ws_bytes = sparse_->WorkspaceBytes(*plans.sparse);
        break;
      case OperatorKind::kMultihead:
        bytes = plans.multihead->tensor_bytes;
        ws_bytes = multihead_->WorkspaceBytes(*plans.multihead);
        break;
    }
    const int inputs = job.requests.front()->inputs();
    absl::StatusOr<memory::Buffer> ws = pool_->Acquire(std::max<size_t>(1, ws_bytes), deadline);
    if (!ws.ok()) return ws.status();
    const DeviceLoc host = DeviceLoc::Host();
    const bool packed = !RunsInPlaceOnHost(job);
    // Q, K, V (or X) and O (or Y): the requests' own memory, or leases they are packed into.
    const void* in[3] = {nullptr, nullptr, nullptr};
    void* out = nullptr;
    memory::Buffer in_leases[3], out_lease;
    if (packed) {
      for (int t = 0; t < inputs; ++t) {
        absl::StatusOr<memory::Buffer> leased = pool_->Acquire(bytes, deadline);
        if (!leased.ok()) return leased.status();
        in_leases[t] = *std::move(leased);
        size_t at = 0;
        for (const auto& r : job.requests) {
          const absl::string_view src = r->tensor(t);
          std::memcpy(static_cast<std::byte*>(in_leases[t].data()) + at, src.data(), src.size());
          at += src.size();
        }
        in[t] = in_leases[t].data();
      }
      absl::StatusOr<memory::Buffer> leased = pool_->Acquire(bytes, deadline);
      if (!leased.ok()) return leased.status();
      out_lease = *std::move(leased);
      out = out_lease.data();
    } else {
      InferenceRequest& r = *job.requests.front();
      out = r.output_target.data;
      if (out == nullptr) {
        absl::StatusOr<memory::Buffer> leased = pool_->Acquire(bytes, deadline);
        if (!leased.ok()) return leased.status();
        r.output = *std::move(leased);
        out = r.output.data();
      }
      for (int t = 0; t < inputs; ++t) in[t] = r.tensor(t).data();
    }
    const absl::Time copied_in = MonotonicNow();
    job.compute_input = copied_in - job.start;
    const attention::TensorRef workspace{ws->data(), ws->size(), host};
    // A job whose every request was cancelled (its clients gone, their deadlines past, or the
    // shutdown's grace period over) stops between tiles: a long CPU job would otherwise compute
    // for no one, and hold the engine (and a shutdown) until it ended.
    const auto all_cancelled = [&job] {
      return std::all_of(job.requests.begin(), job.requests.end(),
                         [](const auto& r) { return r->cancelled->load(); });
    };
    absl::Status run;
    attention::cpu::ScopedStopCheck stop_check(all_cancelled);
    switch (kind) {
      case OperatorKind::kDilatedAttention:
      case OperatorKind::kBlockSparse: {
        const attention::AttentionTensors t{
            {in[0], bytes, host}, {in[1], bytes, host}, {in[2], bytes, host}, {out, bytes, host}};
        run = kind == OperatorKind::kDilatedAttention ? dilated_->Run(*plans.dilated, t, workspace)
                                                      : sparse_->Run(*plans.sparse, t, workspace);
        break;
      }
      case OperatorKind::kMultihead:
        run = multihead_->Run(*plans.multihead, {{in[0], bytes, host}, {out, bytes, host}},
                              workspace);
        break;
    }
    const absl::Time computed = MonotonicNow();
    job.compute_infer = computed - copied_in;
    if (!run.ok()) return run;
    if (all_cancelled()) {
      return absl::CancelledError("every request of the job was cancelled while it computed");
    }
    if (packed) {
      size_t at = 0;
      for (const auto& r : job.requests) {
        void* dst = r->output_target.data;
        if (dst == nullptr) {
          absl::StatusOr<memory::Buffer> leased = pool_->Acquire(r->tensor_bytes, deadline);
          if (!leased.ok()) return leased.status();
          r->output = *std::move(leased);
          dst = r->output.data();
        }
        std::memcpy(dst, static_cast<const char*>(out) + at, r->tensor_bytes);
        at += r->tensor_bytes;
      }
    }
    job.compute_output = MonotonicNow() - computed;
    return absl::OkStatus();
  }

 private:
  ExecutorOptions options_;
  std::unique_ptr<attention::AttentionBackend> dilated_;
  std::unique_ptr<block_sparse::BlockSparseBackend> sparse_;
  std::unique_ptr<multihead::MultiheadBackend> multihead_;
  std::shared_ptr<memory::BufferPool> pool_;
};

}  // namespace

Job::~Job() = default;

namespace {

// Whether Q, K, V and the output range (when the request gives one) all start on `align`-byte
// boundaries and the output overlaps no input: O is written while the inputs are still read.
bool AlignedWithoutOverlap(const InferenceRequest& r, size_t align) {
  const std::byte* o = r.output_target.data;
  if (o != nullptr && reinterpret_cast<uintptr_t>(o) % align != 0) return false;
  for (int t = 0; t < r.inputs(); ++t) {
    const absl::string_view in = r.tensor(t);
    const auto* b = reinterpret_cast<const std::byte*>(in.data());
    if (reinterpret_cast<uintptr_t>(b) % align != 0) return false;
    if (o != nullptr && b < o + r.tensor_bytes && o < b + in.size()) return false;
  }
  return true;
}

}  // namespace

absl::Status StageHostSharedMemory(Job& job, memory::BufferPool& pool, bool pinned_too,
                                   absl::Time deadline) {
  auto needs = [pinned_too](const SharedMemoryRegion* region) {
    return region != nullptr && (pinned_too || !region->info().pinned);
  };
  for (const auto& r : job.requests) {
    int staged = 0;
    for (int t = 0; t < r->inputs(); ++t) staged += needs(r->host_region[t]) ? 1 : 0;
    if (staged > 0 && r->staged.data() == nullptr) {
      absl::StatusOr<memory::Buffer> lease =
          pool.Acquire(static_cast<size_t>(staged) * r->tensor_bytes, deadline);
      if (!lease.ok()) return lease.status();
      r->staged = *std::move(lease);
      auto* at = static_cast<char*>(r->staged.data());
      absl::string_view* views[3] = {&r->q, &r->k, &r->v};
      for (int t = 0; t < r->inputs(); ++t) {
        if (!needs(r->host_region[t])) continue;
        absl::Status copied =
            CopyGuarded(at, views[t]->data(), r->tensor_bytes, *r->host_region[t]);
        if (!copied.ok()) {
          std::memset(at, 0, r->tensor_bytes);  // computed with the job, never returned
          if (r->failed.ok()) r->failed = copied;
        }
        *views[t] = absl::string_view(at, r->tensor_bytes);
        r->host_region[t] = nullptr;
        at += r->tensor_bytes;
      }
    }
    if (needs(r->host_region[3]) && r->output_target.data != nullptr) {
      r->deferred_output = r->output_target.data;
      r->output_target = {};
    }
  }
  return absl::OkStatus();
}

bool HostOutputOverlapsInputs(const InferenceRequest& r) {
  const SharedMemoryRegion* out = r.host_region[3];
  if (out == nullptr || r.output_target.data == nullptr) return false;
  for (int t = 0; t < r.inputs(); ++t) {
    const SharedMemoryRegion* in = r.host_region[t];
    const absl::string_view view = r.tensor(t);
    if (in != nullptr &&
        out->Overlaps(r.output_target.data, r.tensor_bytes, *in,
                      reinterpret_cast<const std::byte*>(view.data()), view.size())) {
      return true;
    }
  }
  return false;
}

bool HostOutputOverlapsInputs(const Job& job) {
  for (const auto& r : job.requests) {
    if (HostOutputOverlapsInputs(*r)) return true;
  }
  return false;
}

absl::Status CompleteHostOutput(InferenceRequest& r) {
  if (r.deferred_output != nullptr) {
    absl::Status s =
        CopyGuarded(r.deferred_output, r.output.data(), r.tensor_bytes, *r.host_region[3]);
    r.deferred_output = nullptr;
    r.output = memory::Buffer();  // O is in shared memory: the response carries none
    return s;
  }
  // Regions a GPU read and wrote by DMA: pinned pages stay when the object shrinks, so nothing
  // faulted, but an output written there no longer reaches the client.
  for (const SharedMemoryRegion* region : r.host_region) {
    if (region != nullptr && !region->StillBacked()) return ShrunkWhileInUse(*region);
  }
  return absl::OkStatus();
}

void WaitForInputs(const Job& job) {
  for (const auto& r : job.requests) {
    if (r->fill != nullptr) r->fill->WaitForAll();
  }
}

void WaitForInputBytes(const Job& job, size_t end) {
  size_t at = 0;
  for (const auto& r : job.requests) {
    if (at >= end) return;
    const size_t size = r->tensor(0).size();
    if (r->fill != nullptr && r->fill->row_bytes() > 0) {
      const size_t bytes = std::min(end - at, size);
      r->fill->WaitForRows(
          static_cast<int64_t>((bytes + r->fill->row_bytes() - 1) / r->fill->row_bytes()));
    }
    at += size;
  }
}

bool InputsInPlace(const std::vector<std::unique_ptr<InferenceRequest>>& requests) {
  return std::all_of(requests.begin(), requests.end(),
                     [](const auto& r) { return r->fill == nullptr || r->fill->complete(); });
}

bool RunsInPlaceOnHost(const Job& job) {
  // Shared-memory tensors sit at whatever offsets the client chose: the kernels need whole
  // elements.
  return job.requests.size() == 1 &&
         AlignedWithoutOverlap(*job.requests.front(),
                               attention::DTypeSize(job.requests.front()->dtype));
}

bool RunsInPlace(const Job& job, bool convert, int device) {
  if (convert || job.requests.size() != 1) return false;
  const InferenceRequest& r = *job.requests.front();
  if (r.output_target.data == nullptr || r.output_target.device != device) return false;
  for (int i = 0; i < r.inputs(); ++i) {
    if (r.input_device[i] != device || r.tensor(i).size() != r.tensor_bytes) return false;
  }
  return AlignedWithoutOverlap(r, 16);  // the kernel's 16-byte loads and stores
}

JobPlans PlanJob(const Job& job, attention::DType dtype) {
  attention::ProblemShape shape = job.shape;
  shape.dtype = dtype;
  return PlanOperator(job.requests.front()->options, shape);
}

JobPlans PlanOperator(const OperatorOptions& o, const attention::ProblemShape& shape) {
  JobPlans plans;
  switch (o.kind) {
    case OperatorKind::kDilatedAttention:
      plans.dilated = attention::PlanAttention(o.dilated, shape);
      break;
    case OperatorKind::kBlockSparse:
      plans.sparse = block_sparse::PlanBlockSparse(o.sparse, shape);
      break;
    case OperatorKind::kMultihead:
      plans.multihead = multihead::PlanMultihead(o.weights, o.dilated, shape);
      break;
  }
  return plans;
}

absl::Status JobPlans::status(OperatorKind kind) const {
  switch (kind) {
    case OperatorKind::kDilatedAttention:
      return dilated.status();
    case OperatorKind::kBlockSparse:
      return sparse.status();
    case OperatorKind::kMultihead:
      return multihead.status();
  }
  return absl::InternalError("unknown operator");
}

PlanFacts JobPlans::facts(OperatorKind kind) const {
  PlanFacts f;
  if (kind == OperatorKind::kBlockSparse) f.kept_pairs = sparse->kept_pairs;
  return f;
}

absl::StatusOr<std::shared_ptr<memory::BufferPool>> CreateHostPool(const ExecutorOptions& options) {
  absl::StatusOr<std::unique_ptr<memory::BufferPool>> pool = memory::BufferPool::Create(
      {"host", options.host_pool_bytes}, memory::NewStagingHostAllocator());
  if (!pool.ok()) return pool.status();
  return std::shared_ptr<memory::BufferPool>(*std::move(pool));
}

absl::StatusOr<std::unique_ptr<Executor>> CreateCpuExecutor(
    const ExecutorOptions& options, std::shared_ptr<memory::BufferPool> host) {
  attention::CpuBackendOptions cpu{options.cpu_threads, "auto"};
  absl::StatusOr<std::unique_ptr<attention::AttentionBackend>> dilated =
      attention::CreateCpuBackend(cpu);
  if (!dilated.ok()) return dilated.status();
  absl::StatusOr<std::unique_ptr<block_sparse::BlockSparseBackend>> sparse =
      block_sparse::CreateCpuBlockSparseBackend(cpu);
  if (!sparse.ok()) return sparse.status();
  // The multihead module's attention is the executor's own backend (its threads, not a copy).
  absl::StatusOr<std::unique_ptr<multihead::MultiheadBackend>> multihead =
      multihead::CreateCpuMultiheadBackend(cpu, dilated->get());
  if (!multihead.ok()) return multihead.status();
  if (host == nullptr) {
    absl::StatusOr<std::shared_ptr<memory::BufferPool>> pool = CreateHostPool(options);
    if (!pool.ok()) return pool.status();
    host = *std::move(pool);
  }
  return std::unique_ptr<Executor>(new CpuExecutor(options, *std::move(dilated), *std::move(sparse),
                                                   *std::move(multihead), std::move(host)));
}

}  // namespace dilattn::server
