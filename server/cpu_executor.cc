// The CPU executor: one request runs straight on its message's memory (or its shared-memory
// region) where the kernels can take it as it is; otherwise, and for several requests, the
// tensors are packed into leased host buffers. Start() does the whole job; Wait() has nothing
// left to wait for.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kernels/memory/allocator.h"
#include "server/executor.h"

namespace dilattn::server {
namespace {

class CpuExecutor final : public Executor {
 public:
  CpuExecutor(const ExecutorOptions& options,
              std::unique_ptr<attention::AttentionBackend> dilated,
              std::unique_ptr<block_sparse::BlockSparseBackend> sparse,
              std::shared_ptr<memory::BufferPool> pool)
      : options_(options),
        dilated_(std::move(dilated)),
        sparse_(std::move(sparse)),
        pool_(std::move(pool)) {}

  std::string name() const override { return std::string(dilated_->name()); }
  std::vector<const memory::BufferPool*> pools() const override { return {pool_.get()}; }
  memory::BufferPool& staging_pool() override { return *pool_; }

  absl::Status Supports(const InferenceRequest& r) const override {
    if (r.touches_device_memory()) {
      return absl::InvalidArgumentError(
          "a tensor is in CUDA shared memory, but this request runs on the CPU (the server has "
          "no GPU, or no GPU kernel covers the model's operator and shape): use system shared "
          "memory or send the tensors in the message");
    }
    const attention::ProblemShape shape =
        attention::DenseShape(r.dtype, r.batch, r.seq_len, r.heads, r.head_dim);
    if (r.options.kind == OperatorKind::kDilatedAttention) {
      absl::StatusOr<attention::AttentionPlan> plan =
          attention::PlanAttention(r.options.dilated, shape);
      return plan.ok() ? dilated_->Supports(*plan) : plan.status();
    }
    absl::StatusOr<block_sparse::BlockSparsePlan> plan =
        block_sparse::PlanBlockSparse(r.options.sparse, shape);
    return plan.ok() ? sparse_->Supports(*plan) : plan.status();
  }

  absl::Status Start(Job& job) override { return RunOnHost(job); }
  absl::Status Wait(Job&) override { return absl::OkStatus(); }

  // Also the CUDA executor's path for what its GPU kernels do not cover.
  absl::Status RunOnHost(Job& job) {
    job.on_host = true;
    JobPlans plans = PlanJob(job, job.shape.dtype);
    const bool dilated = job.requests.front()->options.kind == OperatorKind::kDilatedAttention;
    if (dilated && !plans.dilated.ok()) return plans.dilated.status();
    if (!dilated && !plans.sparse.ok()) return plans.sparse.status();
    const size_t bytes = dilated ? plans.dilated->tensor_bytes : plans.sparse->tensor_bytes;
    const size_t ws_bytes = dilated ? dilated_->WorkspaceBytes(*plans.dilated)
                                    : sparse_->WorkspaceBytes(*plans.sparse);
    const absl::Time deadline = job.start + options_.pool_wait;
    absl::StatusOr<memory::Buffer> ws = pool_->Acquire(std::max<size_t>(1, ws_bytes), deadline);
    if (!ws.ok()) return ws.status();
    const DeviceLoc host = DeviceLoc::Host();
    attention::AttentionTensors t;
    const bool packed = !RunsInPlaceOnHost(job);
    memory::Buffer q, k, v, o;
    if (packed) {
      for (memory::Buffer* b : {&q, &k, &v, &o}) {
        absl::StatusOr<memory::Buffer> leased = pool_->Acquire(bytes, deadline);
        if (!leased.ok()) return leased.status();
        *b = *std::move(leased);
      }
      size_t at = 0;
      for (const auto& r : job.requests) {
        std::memcpy(static_cast<std::byte*>(q.data()) + at, r->q.data(), r->tensor_bytes);
        std::memcpy(static_cast<std::byte*>(k.data()) + at, r->k.data(), r->tensor_bytes);
        std::memcpy(static_cast<std::byte*>(v.data()) + at, r->v.data(), r->tensor_bytes);
        at += r->tensor_bytes;
      }
      t = {{q.data(), bytes, host}, {k.data(), bytes, host}, {v.data(), bytes, host},
           {o.data(), bytes, host}};
    } else {
      InferenceRequest& r = *job.requests.front();
      void* o_data = r.output_target.data;
      if (o_data == nullptr) {
        absl::StatusOr<memory::Buffer> out = pool_->Acquire(bytes, deadline);
        if (!out.ok()) return out.status();
        r.output = *std::move(out);
        o_data = r.output.data();
      }
      t = {{r.q.data(), bytes, host}, {r.k.data(), bytes, host}, {r.v.data(), bytes, host},
           {o_data, bytes, host}};
    }
    const absl::Time copied_in = absl::Now();
    job.compute_input = copied_in - job.start;
    const attention::TensorRef workspace{ws->data(), ws->size(), host};
    absl::Status run = dilated ? dilated_->Run(*plans.dilated, t, workspace)
                               : sparse_->Run(*plans.sparse, t, workspace);
    const absl::Time computed = absl::Now();
    job.compute_infer = computed - copied_in;
    if (!run.ok()) return run;
    if (packed) {
      size_t at = 0;
      for (const auto& r : job.requests) {
        void* dst = r->output_target.data;
        if (dst == nullptr) {
          absl::StatusOr<memory::Buffer> out = pool_->Acquire(r->tensor_bytes, deadline);
          if (!out.ok()) return out.status();
          r->output = *std::move(out);
          dst = r->output.data();
        }
        std::memcpy(dst, static_cast<const char*>(o.data()) + at, r->tensor_bytes);
        at += r->tensor_bytes;
      }
    }
    job.compute_output = absl::Now() - computed;
    return absl::OkStatus();
  }

 private:
  ExecutorOptions options_;
  std::unique_ptr<attention::AttentionBackend> dilated_;
  std::unique_ptr<block_sparse::BlockSparseBackend> sparse_;
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
  for (absl::string_view in : {r.q, r.k, r.v}) {
    const auto* b = reinterpret_cast<const std::byte*>(in.data());
    if (reinterpret_cast<uintptr_t>(b) % align != 0) return false;
    if (o != nullptr && b < o + r.tensor_bytes && o < b + in.size()) return false;
  }
  return true;
}

}  // namespace

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
  const absl::string_view in[3] = {r.q, r.k, r.v};
  for (int i = 0; i < 3; ++i) {
    if (r.input_device[i] != device || in[i].size() != r.tensor_bytes) return false;
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
  if (o.kind == OperatorKind::kDilatedAttention) {
    plans.dilated = attention::PlanAttention(o.dilated, shape);
  } else {
    plans.sparse = block_sparse::PlanBlockSparse(o.sparse, shape);
  }
  return plans;
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
  if (host == nullptr) {
    absl::StatusOr<std::shared_ptr<memory::BufferPool>> pool = CreateHostPool(options);
    if (!pool.ok()) return pool.status();
    host = *std::move(pool);
  }
  return std::unique_ptr<Executor>(new CpuExecutor(options, *std::move(dilated),
                                                   *std::move(sparse), std::move(host)));
}

}  // namespace dilattn::server
