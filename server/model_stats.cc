#include "server/model_stats.h"

#include "absl/time/clock.h"

namespace dilattn::server {
namespace {

double Micros(absl::Duration d) { return absl::ToDoubleMicroseconds(NonNegative(d)); }
double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(NonNegative(d)); }

void Set(inference::StatisticDuration* out, uint64_t count, uint64_t ns) {
  out->set_count(count);
  out->set_ns(ns);
}

}  // namespace

void ModelStats::RequestSucceeded(absl::Duration total, const RequestTimings& t,
                                  int64_t inferences) {
  {
    absl::MutexLock lock(&mu_);
    success_.Add(total);
    queue_.Add(t.queue);
    compute_input_.Add(t.compute_input);
    compute_infer_.Add(t.compute_infer);
    compute_output_.Add(t.compute_output);
    inference_count_ += static_cast<uint64_t>(inferences);
    last_inference_ms_ = static_cast<uint64_t>(absl::ToUnixMillis(absl::Now()));
  }
  metrics_->success->Increment();
  metrics_->inference_count->Increment(static_cast<double>(inferences));
  metrics_->request_us->Increment(Micros(total));
  metrics_->queue_us->Increment(Micros(t.queue));
  metrics_->compute_input_us->Increment(Micros(t.compute_input));
  metrics_->compute_infer_us->Increment(Micros(t.compute_infer));
  metrics_->compute_output_us->Increment(Micros(t.compute_output));
  metrics_->request_seconds->Observe(Seconds(total));
  metrics_->queue_seconds->Observe(Seconds(t.queue));
  metrics_->overhead_seconds->Observe(Seconds(total - t.compute_infer));
}

void ModelStats::RequestFailed(absl::Duration total, FailureReason reason) {
  {
    absl::MutexLock lock(&mu_);
    fail_.Add(total);
  }
  metrics_->failure[static_cast<int>(reason)]->Increment();
}

void ModelStats::Executed(int64_t batch_size, absl::Duration compute_input,
                          absl::Duration compute_infer, absl::Duration compute_output,
                          ExecutionPath path) {
  {
    absl::MutexLock lock(&mu_);
    ++execution_count_;
    BatchDurations& b = batches_[static_cast<uint64_t>(batch_size)];
    b.compute_input.Add(compute_input);
    b.compute_infer.Add(compute_infer);
    b.compute_output.Add(compute_output);
  }
  metrics_->exec_count->Increment();
  metrics_->executions[static_cast<int>(path)]->Increment();
  metrics_->batch_size->Observe(static_cast<double>(batch_size));
  metrics_->compute_seconds->Observe(Seconds(compute_input + compute_infer + compute_output));
}

void ModelStats::AddPending(int64_t delta) {
  metrics_->pending->Increment(static_cast<double>(delta));
}

void ModelStats::Fill(inference::ModelStatistics* out) const {
  absl::MutexLock lock(&mu_);
  out->set_last_inference(last_inference_ms_);
  out->set_inference_count(inference_count_);
  out->set_execution_count(execution_count_);
  inference::InferStatistics* s = out->mutable_inference_stats();
  Set(s->mutable_success(), success_.count, success_.ns);
  Set(s->mutable_fail(), fail_.count, fail_.ns);
  Set(s->mutable_queue(), queue_.count, queue_.ns);
  Set(s->mutable_compute_input(), compute_input_.count, compute_input_.ns);
  Set(s->mutable_compute_infer(), compute_infer_.count, compute_infer_.ns);
  Set(s->mutable_compute_output(), compute_output_.count, compute_output_.ns);
  for (const auto& [size, d] : batches_) {
    inference::InferBatchStatistics* b = out->add_batch_stats();
    b->set_batch_size(size);
    Set(b->mutable_compute_input(), d.compute_input.count, d.compute_input.ns);
    Set(b->mutable_compute_infer(), d.compute_infer.count, d.compute_infer.ns);
    Set(b->mutable_compute_output(), d.compute_output.count, d.compute_output.ns);
  }
}

}  // namespace dilattn::server
