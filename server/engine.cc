#include "server/engine.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "kernels/memory/allocator.h"
#include "server/log.h"
#include "server/model.h"

namespace dilattn::server {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::unique_ptr<Engine> e(new Engine());
  const std::string& d = options.device;
  int cuda_device = -1;
  if (d == "auto") {
    if (memory::CudaDeviceCount() > 0) cuda_device = 0;
  } else if (d == "cuda") {
    cuda_device = 0;
  } else if (absl::StartsWith(d, "cuda:")) {
    if (!absl::SimpleAtoi(d.substr(5), &cuda_device) || cuda_device < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--device '", d, "': bad device number"));
    }
  } else if (d != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device '", d, "' is not one of auto, cpu, cuda, cuda:N"));
  }
  absl::StatusOr<std::unique_ptr<Executor>> executor =
      cuda_device >= 0 ? CreateCudaExecutor(options.executor, cuda_device)
                       : CreateCpuExecutor(options.executor);
  if (!executor.ok() && d == "auto" && cuda_device >= 0) {
    // "auto" means the best device that works: a GPU the kernels cannot use leaves the CPU.
    LogWarning("GPU %d unusable (%s); serving on the CPU", cuda_device,
               executor.status().ToString());
    executor = CreateCpuExecutor(options.executor);
  }
  if (!executor.ok()) return executor.status();
  e->executor_ = *std::move(executor);
  e->thread_ = std::thread([engine = e.get()] { engine->Loop(); });
  return e;
}

Engine::~Engine() { Shutdown(); }

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
  std::unique_ptr<Job> in_flight;
  while (true) {
    std::unique_ptr<Batch> next;
    {
      absl::MutexLock lock(&mu_);
      if (in_flight == nullptr) {
        auto ready = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
          return !queue_.empty() || stopping_;
        };
        mu_.Await(absl::Condition(&ready));
        if (queue_.empty()) return;  // stopping, nothing left
      }
      if (!queue_.empty()) {
        next = std::make_unique<Batch>(std::move(queue_.front()));
        queue_.pop_front();
        ++free_slots_;  // the next batch may form while this one runs
      }
    }
    // Start the next batch before waiting for the previous one: its copies overlap the
    // previous kernel.
    std::unique_ptr<Job> started = next != nullptr ? StartJob(std::move(*next)) : nullptr;
    if (in_flight != nullptr) FinishJob(std::move(in_flight));
    in_flight = std::move(started);
  }
}

std::unique_ptr<Job> Engine::StartJob(Batch batch) {
  auto job = std::make_unique<Job>();
  job->model = batch.model;
  job->start = absl::Now();
  // Last look before computing: whatever was cancelled or expired since it was queued leaves now.
  for (auto& r : batch.requests) {
    if (r->cancelled->load()) {
      CompleteRequest(std::move(r), absl::CancelledError("request cancelled; it was not computed"));
    } else if (r->deadline <= job->start) {
      CompleteRequest(std::move(r), absl::DeadlineExceededError(
                                        "request timeout expired before execution; it was not "
                                        "computed"));
    } else {
      job->requests.push_back(std::move(r));
    }
  }
  if (job->requests.empty()) return nullptr;
  const InferenceRequest& first = *job->requests.front();
  job->shape.dtype = first.dtype;
  job->shape.num_heads = first.heads;
  job->shape.head_dim = first.head_dim;
  for (const auto& r : job->requests) {
    for (int64_t b = 0; b < r->batch; ++b) job->shape.seq_lengths.push_back(r->seq_len);
  }
  if (absl::Status s = executor_->Start(*job); !s.ok()) {
    LogError("starting %d request(s) for %s failed: %s",
             static_cast<int>(job->requests.size()), job->model->name(), s.ToString());
    for (auto& r : job->requests) CompleteRequest(std::move(r), s);
    return nullptr;
  }
  return job;
}

void Engine::FinishJob(std::unique_ptr<Job> job) {
  const absl::Status s = executor_->Wait(*job);
  if (!s.ok()) {
    for (auto& r : job->requests) CompleteRequest(std::move(r), s);
    return;
  }
  int64_t sequences = 0;
  for (const auto& r : job->requests) sequences += r->batch;
  job->model->stats().Executed(sequences, job->compute_input, job->compute_infer,
                               job->compute_output);
  for (auto& r : job->requests) {
    const RequestTimings t{job->start - r->enqueued, job->compute_input, job->compute_infer,
                           job->compute_output};
    CompleteRequest(std::move(r), absl::OkStatus(), t);
  }
}

}  // namespace dilattn::server
