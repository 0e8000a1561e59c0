#include "server/engine.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kernels/memory/allocator.h"
#include "server/log.h"
#include "server/model.h"

namespace dilattn::server {
namespace {

// Leases `bytes` (at least one) from `pool`, waiting until `deadline`.
absl::StatusOr<memory::Buffer> Lease(memory::BufferPool& pool, size_t bytes, absl::Time deadline) {
  return pool.Acquire(bytes == 0 ? 1 : bytes, deadline);
}

}  // namespace

attention::ProblemShape BatchShape(const std::vector<std::unique_ptr<InferenceRequest>>& requests) {
  attention::ProblemShape shape;
  const InferenceRequest& first = *requests.front();
  shape.dtype = first.dtype;
  shape.num_heads = first.heads;
  shape.head_dim = first.head_dim;
  for (const auto& r : requests) {
    for (int64_t b = 0; b < r->batch; ++b) shape.seq_lengths.push_back(r->seq_len);
  }
  return shape;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::unique_ptr<Engine> e(new Engine());
  e->options_ = options;
  if (options.device != "auto" && options.device != "cpu" && options.device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device '", options.device, "' is not one of auto, cpu, cuda"));
  }
  if (options.device == "cuda") {
    return absl::FailedPreconditionError(
        "--device cuda: this build has no CUDA attention kernels; use --device cpu or auto");
  }
  attention::CpuBackendOptions cpu{options.cpu_threads, "auto"};
  absl::StatusOr<std::unique_ptr<attention::AttentionBackend>> dilated =
      attention::CreateCpuBackend(cpu);
  if (!dilated.ok()) return dilated.status();
  absl::StatusOr<std::unique_ptr<block_sparse::BlockSparseBackend>> sparse =
      block_sparse::CreateCpuBlockSparseBackend(cpu);
  if (!sparse.ok()) return sparse.status();
  e->dilated_ = *std::move(dilated);
  e->sparse_ = *std::move(sparse);
  absl::StatusOr<std::unique_ptr<memory::BufferPool>> pool = memory::BufferPool::Create(
      {"host", options.host_pool_bytes}, memory::NewStagingHostAllocator());
  if (!pool.ok()) return pool.status();
  e->host_pool_ = *std::move(pool);
  e->thread_ = std::thread([engine = e.get()] { engine->Loop(); });
  return e;
}

Engine::~Engine() { Shutdown(); }

std::string Engine::backend_name() const { return std::string(dilated_->name()); }
DeviceLoc Engine::location() const { return dilated_->location(); }
std::vector<const memory::BufferPool*> Engine::pools() const { return {host_pool_.get()}; }

absl::Status Engine::Supports(const InferenceRequest& r) const {
  attention::ProblemShape shape = attention::DenseShape(r.dtype, r.batch, r.seq_len, r.heads,
                                                        r.head_dim);
  if (r.options.kind == OperatorKind::kDilatedAttention) {
    absl::StatusOr<attention::AttentionPlan> plan = attention::PlanAttention(r.options.dilated, shape);
    if (!plan.ok()) return plan.status();
    return dilated_->Supports(*plan);
  }
  absl::StatusOr<block_sparse::BlockSparsePlan> plan =
      block_sparse::PlanBlockSparse(r.options.sparse, shape);
  if (!plan.ok()) return plan.status();
  return sparse_->Supports(*plan);
}

bool Engine::AcquireSlot(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return free_slots_ > 0 || stopping_; };
  mu_.AwaitWithDeadline(absl::Condition(&ready), deadline);
  if (stopping_ || free_slots_ == 0) return false;
  --free_slots_;
  return true;
}

void Engine::ReleaseSlot() {
  absl::MutexLock lock(&mu_);
  ++free_slots_;
}

void Engine::Submit(Batch batch) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(batch));
}

void Engine::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void Engine::Loop() {
  while (true) {
    Batch batch;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return !queue_.empty() || stopping_; };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, nothing left
      batch = std::move(queue_.front());
      queue_.pop_front();
      ++free_slots_;  // the next batch may form while this one runs
    }
    Execute(batch);
  }
}

void Engine::Execute(Batch& batch) {
  const absl::Time start = absl::Now();
  // Last look before computing: whatever was cancelled or expired since it was queued leaves now.
  std::vector<std::unique_ptr<InferenceRequest>> live;
  for (auto& r : batch.requests) {
    if (r->cancelled->load()) {
      CompleteRequest(std::move(r), absl::CancelledError("request cancelled; it was not computed"));
    } else if (r->deadline <= start) {
      CompleteRequest(std::move(r), absl::DeadlineExceededError(
                                        "request timeout expired before execution; it was not "
                                        "computed"));
    } else {
      live.push_back(std::move(r));
    }
  }
  if (live.empty()) return;
  auto fail_all = [&](const absl::Status& s) {
    for (auto& r : live) CompleteRequest(std::move(r), s);
  };

  const InferenceRequest& first = *live.front();
  const attention::ProblemShape shape = BatchShape(live);
  const bool dilated = first.options.kind == OperatorKind::kDilatedAttention;
  absl::StatusOr<attention::AttentionPlan> dplan;
  absl::StatusOr<block_sparse::BlockSparsePlan> splan;
  size_t bytes = 0;
  size_t workspace_bytes = 0;
  if (dilated) {
    dplan = attention::PlanAttention(first.options.dilated, shape);
    if (!dplan.ok()) return fail_all(dplan.status());
    bytes = dplan->tensor_bytes;
    workspace_bytes = dilated_->WorkspaceBytes(*dplan);
  } else {
    splan = block_sparse::PlanBlockSparse(first.options.sparse, shape);
    if (!splan.ok()) return fail_all(splan.status());
    bytes = splan->tensor_bytes;
    workspace_bytes = sparse_->WorkspaceBytes(*splan);
  }

  const absl::Time pool_deadline = start + options_.pool_wait;
  absl::StatusOr<memory::Buffer> workspace = Lease(*host_pool_, workspace_bytes, pool_deadline);
  if (!workspace.ok()) return fail_all(workspace.status());

  // One request runs straight on its message's memory; several are packed into leased buffers.
  const bool packed = live.size() > 1;
  memory::Buffer q, k, v, o;
  attention::AttentionTensors tensors;
  const DeviceLoc host = DeviceLoc::Host();
  if (packed) {
    for (memory::Buffer* b : {&q, &k, &v, &o}) {
      absl::StatusOr<memory::Buffer> leased = Lease(*host_pool_, bytes, pool_deadline);
      if (!leased.ok()) return fail_all(leased.status());
      *b = *std::move(leased);
    }
    size_t at = 0;
    for (const auto& r : live) {
      std::memcpy(static_cast<std::byte*>(q.data()) + at, r->q.data(), r->tensor_bytes);
      std::memcpy(static_cast<std::byte*>(k.data()) + at, r->k.data(), r->tensor_bytes);
      std::memcpy(static_cast<std::byte*>(v.data()) + at, r->v.data(), r->tensor_bytes);
      at += r->tensor_bytes;
    }
    tensors = {{q.data(), bytes, host}, {k.data(), bytes, host}, {v.data(), bytes, host},
               {o.data(), bytes, host}};
  } else {
    InferenceRequest& r = *live.front();
    r.output->resize(bytes);
    tensors = {{r.q.data(), bytes, host}, {r.k.data(), bytes, host}, {r.v.data(), bytes, host},
               {r.output->data(), bytes, host}};
  }
  const absl::Time copied_in = absl::Now();

  const attention::TensorRef ws{workspace->data(), workspace->size(), host};
  const absl::Status run = dilated ? dilated_->Run(*dplan, tensors, ws)
                                   : sparse_->Run(*splan, tensors, ws);
  const absl::Time computed = absl::Now();
  if (!run.ok()) {
    LogError("execution of %d request(s) for %s failed: %s", static_cast<int>(live.size()),
             batch.model->name(), run.ToString());
    return fail_all(run);
  }
  if (packed) {
    size_t at = 0;
    for (const auto& r : live) {
      r->output->assign(static_cast<const char*>(o.data()) + at, r->tensor_bytes);
      at += r->tensor_bytes;
    }
  }
  const absl::Time end = absl::Now();

  int64_t sequences = 0;
  for (const auto& r : live) sequences += r->batch;
  batch.model->stats().Executed(sequences, copied_in - start, computed - copied_in, end - computed);
  for (auto& r : live) {
    const RequestTimings t{start - r->enqueued, copied_in - start, computed - copied_in,
                           end - computed};
    CompleteRequest(std::move(r), absl::OkStatus(), t);
  }
}

}  // namespace dilattn::server
