#pragma once

// One engine per device. Its thread owns the device's backends (and, on a GPU, its streams):
// it takes batches formed by the models' schedulers, leases buffers from the pools, copies the
// requests' tensors in, runs the kernel, copies the outputs out and completes the requests.
// Nothing else touches the device.

#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/attention/attention.h"
#include "kernels/block_sparse/block_sparse.h"
#include "kernels/memory/buffer_pool.h"
#include "server/request.h"

namespace dilattn::server {

struct Batch {
  Model* model = nullptr;
  std::vector<std::unique_ptr<InferenceRequest>> requests;
};

struct EngineOptions {
  std::string device = "auto";  // "auto" (a GPU when there is one), "cpu", "cuda"
  int cpu_threads = 0;          // 0: one per hardware thread
  size_t host_pool_bytes = size_t{16} << 30;
  absl::Duration pool_wait = absl::Seconds(10);  // how long a batch may wait for buffers
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();

  std::string backend_name() const;
  DeviceLoc location() const;
  std::vector<const memory::BufferPool*> pools() const;

  // Whether this engine can run `r` alone, asked of the same selector execution uses. Safe from
  // any thread.
  absl::Status Supports(const InferenceRequest& r) const;

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
  void Execute(Batch& batch);

  EngineOptions options_;
  std::unique_ptr<attention::AttentionBackend> dilated_;
  std::unique_ptr<block_sparse::BlockSparseBackend> sparse_;
  std::unique_ptr<memory::BufferPool> host_pool_;

  absl::Mutex mu_;
  int free_slots_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<Batch> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Builds the packed problem of `requests` (all with the first one's batch key).
attention::ProblemShape BatchShape(const std::vector<std::unique_ptr<InferenceRequest>>& requests);

}  // namespace dilattn::server
