// The engine's gang runner: one long sequence split across every GPU of the server by
// kernels/attention/cuda/sequence_parallel_runner (NCCL exchanges of the spanning branches'
// dilated rows). Host tensors in (the request's message or system shared memory), host output
// out.

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/attention/cuda/launch.h"
#include "kernels/attention/cuda/sequence_parallel_runner.h"
#include "kernels/attention/padded_plan.h"
#include "kernels/attention/sequence_parallel.h"
#include "kernels/common/clock.h"
#include "server/executor.h"
#include "server/log.h"

namespace dilattn::server {
namespace {

class SequenceParallelGang final : public GangRunner {
 public:
  SequenceParallelGang(std::unique_ptr<attention::cuda::SequenceParallelRunner> runner,
                       std::unique_ptr<attention::AttentionBackend> check, int64_t min_tokens,
                       memory::BufferPool* staging, absl::Duration pool_wait)
      : runner_(std::move(runner)),
        check_(std::move(check)),
        min_tokens_(min_tokens),
        staging_(staging),
        pool_wait_(pool_wait) {}

  bool Takes(const InferenceRequest& r) const override {
    // Tensors in CUDA shared memory run in place on their GPU with no copies at all; split,
    // half of them would cross to the other GPUs (2 x H100, 1M tokens: 153 ms split against
    // 41 ms in place), so only host tensors, which every way has to copy, are split.
    if (r.options.kind != OperatorKind::kDilatedAttention || r.batch != 1 ||
        r.seq_len < min_tokens_ || r.touches_device_memory() ||
        (r.dtype != attention::DType::kFloat16 && r.dtype != attention::DType::kBFloat16)) {
      return false;
    }
    // Each GPU copies its slice of O back while the others may still be reading their inputs:
    // an output over an input is left to one GPU's executor, which orders the copies for it.
    if (HostOutputOverlapsInputs(r)) return false;
    // The single-GPU kernel's selector: what it runs, the split runs too, padded where it runs
    // padded.
    absl::StatusOr<attention::AttentionPlan> plan = PlanFor(r);
    if (!plan.ok()) return false;
    // Planning the split takes a tile list of the whole sequence: asked once per shape (the pool
    // caps do not change), as the runner keeps its plan of the last shape.
    const std::string shape = absl::StrCat(r.batch_key, "|", r.seq_len);
    {
      absl::MutexLock lock(&fits_mu_);
      if (shape == fits_shape_) return fits_;
    }
    const bool fits = FitsThePools(*plan);
    absl::MutexLock lock(&fits_mu_);
    fits_shape_ = shape;
    fits_ = fits;
    return fits;
  }

  absl::Status Run(Job& job) override {
    if (job.requests.size() != 1) {
      return absl::InternalError("a sequence-parallel job holds one request");
    }
    InferenceRequest& r = *job.requests.front();
    absl::StatusOr<attention::AttentionPlan> plan = PlanFor(r);
    if (!plan.ok()) return plan.status();
    WaitForInputs(job);  // the runner copies each GPU's slice as one piece
    const absl::Time deadline = job.pool_deadline(pool_wait_);
    // Pageable system regions: the driver would copy from them with the CPU.
    if (absl::Status s = StageHostSharedMemory(job, *staging_, /*pinned_too=*/false, deadline);
        !s.ok()) {
      return s;
    }
    void* out = r.output_target.data;
    if (out == nullptr) {
      absl::StatusOr<memory::Buffer> lease = staging_->Acquire(r.tensor_bytes, deadline);
      if (!lease.ok()) return lease.status();
      r.output = *std::move(lease);
      out = r.output.data();
    }
    const DeviceLoc host = DeviceLoc::Host();
    const size_t bytes = r.tensor_bytes;
    const absl::Time begin = MonotonicNow();
    absl::Status s = runner_->Run(*plan,
                                  {{r.q.data(), bytes, host},
                                   {r.k.data(), bytes, host},
                                   {r.v.data(), bytes, host},
                                   {out, bytes, host}},
                                  r.head_dim);
    // The copies in and out are inside the runner's time: all of it counts as compute.
    job.compute_input = begin - job.start;
    job.compute_infer = MonotonicNow() - begin;
    job.on_host = true;
    job.path = ExecutionPath::kSplit;
    if (s.ok()) {
      LogInfo(
          "sequence-parallel run: %d tokens across %d GPUs in %.2f ms (queued %.2f ms after "
          "arriving, started %.2f ms after that)",
          static_cast<int>(r.seq_len), runner_->num_devices(),
          absl::ToDoubleMilliseconds(job.compute_infer),
          absl::ToDoubleMilliseconds(r.enqueued - r.arrival),
          absl::ToDoubleMilliseconds(begin - r.enqueued));
    }
    return s;
  }

  void ReleaseCachedMemory() override { runner_->ReleaseCachedMemory(); }

  std::vector<const memory::BufferPool*> pools() const override { return runner_->pools(); }

 private:
  // The request's plan as the GPUs run it: at its head dim, or padded to the next with a kernel.
  absl::StatusOr<attention::AttentionPlan> PlanFor(const InferenceRequest& r) const {
    absl::StatusOr<attention::AttentionPlan> plan = attention::PlanAttention(
        r.options.dilated, attention::DenseShape(r.dtype, 1, r.seq_len, r.heads, r.head_dim));
    if (!plan.ok()) return plan.status();
    return attention::PlanAsRun(*plan, *check_);
  }

  // Whether every GPU's leases fit its pool. A split can take more per GPU than the whole problem
  // on one GPU (a low-rate branch whose segments span slices has its keys packed on every GPU, and
  // the exchange's buffers come on top): such a request is left to one GPU, which may fit it,
  // rather than failed.
  bool FitsThePools(const attention::AttentionPlan& plan) const {
    const int ranks = runner_->num_devices();
    absl::StatusOr<attention::SequenceParallelPlan> sp = attention::PlanSequenceParallel(
        plan, ranks, attention::cuda::FusedBlockM(plan.params.head_dim));
    if (!sp.ok()) return false;
    const std::vector<std::vector<size_t>> leases =
        attention::SequenceParallelLeases(*sp, plan, ranks);
    const std::vector<size_t> caps = runner_->PoolCaps();
    for (size_t g = 0; g < leases.size() && g < caps.size(); ++g) {
      size_t held = 0;
      for (size_t bytes : leases[g]) {
        const size_t rounded = memory::BufferPool::SizeClass(bytes);
        if (rounded == 0 || rounded > caps[g] || held > caps[g] - rounded) return false;
        held += rounded;
      }
    }
    return true;
  }

  std::unique_ptr<attention::cuda::SequenceParallelRunner> runner_;
  std::unique_ptr<attention::AttentionBackend> check_;
  const int64_t min_tokens_;
  memory::BufferPool* const staging_;
  const absl::Duration pool_wait_;
  // FitsThePools' answer for the last shape asked (Takes runs on the schedulers' threads).
  mutable absl::Mutex fits_mu_;
  mutable std::string fits_shape_ ABSL_GUARDED_BY(fits_mu_);
  mutable bool fits_ ABSL_GUARDED_BY(fits_mu_) = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GangRunner>> CreateSequenceParallelGang(std::vector<int> devices,
                                                                       int64_t min_tokens,
                                                                       memory::BufferPool* staging,
                                                                       absl::Duration pool_wait,
                                                                       size_t device_pool_bytes) {
  if (devices.size() < 2) {
    return absl::InvalidArgumentError("sequence parallelism needs at least two GPUs");
  }
  absl::StatusOr<std::unique_ptr<attention::AttentionBackend>> check =
      attention::CreateCudaBackend({devices.front(), nullptr});
  if (!check.ok()) return check.status();
  absl::StatusOr<std::unique_ptr<attention::cuda::SequenceParallelRunner>> runner =
      attention::cuda::SequenceParallelRunner::Create(std::move(devices), device_pool_bytes);
  if (!runner.ok()) return runner.status();
  return std::unique_ptr<GangRunner>(new SequenceParallelGang(*std::move(runner), *std::move(check),
                                                              min_tokens, staging, pool_wait));
}

}  // namespace dilattn::server
