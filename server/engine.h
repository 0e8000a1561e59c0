#pragma once

// One engine per device. Its thread owns the device's executor (and, on a GPU, its streams): it
// takes batches formed by the models' schedulers and runs them through the executor, starting
// the next batch before waiting for the previous one so that copies overlap compute. Nothing
// else touches the device.

#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/executor.h"
#include "server/request.h"

namespace dilattn::server {

struct Batch {
  Model* model = nullptr;
  std::vector<std::unique_ptr<InferenceRequest>> requests;
};

struct EngineOptions {
  std::string device = "auto";  // "auto" (GPU 0 when there is one), "cpu", "cuda", "cuda:N"
  ExecutorOptions executor;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();

  std::string backend_name() const { return executor_->name(); }
  int cuda_device() const { return executor_->cuda_device(); }  // -1 on the CPU
  std::vector<const memory::BufferPool*> pools() const { return executor_->pools(); }
  memory::BufferPool& staging_pool() { return executor_->staging_pool(); }

  // Whether this engine can run `r`, asked of the same selector execution uses. Any thread.
  absl::Status Supports(const InferenceRequest& r) const { return executor_->Supports(r); }

  // A scheduler reserves a slot before forming a batch, so batches are formed only when the
  // engine can take them and grow while it is busy. False when `deadline` passes first or the
  // engine is shutting down.
  bool AcquireSlot(absl::Time deadline);
  void ReleaseSlot();
  // Hands over a batch in a reserved slot.
  void Submit(Batch batch);

  // Runs every submitted batch, then stops the thread.
  void Shutdown();

 private:
  Engine() = default;
  void Loop();
  // Drops cancelled and expired requests, then starts the rest; null when nothing was started.
  std::unique_ptr<Job> StartJob(Batch batch);
  void FinishJob(std::unique_ptr<Job> job);

  std::unique_ptr<Executor> executor_;
  absl::Mutex mu_;
  int free_slots_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<Batch> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace dilattn::server
