#pragma once

// Runs one long sequence across several GPUs of this node (DESIGN.md section 1, sequence
// parallelism; the plan is kernels/attention/sequence_parallel.h). Each GPU gets its slice of
// Q, K and V from host memory, the GPUs exchange the spanning branches' dilated K/V rows with
// one NCCL all-gather, each runs the fused kernel on its slice's tiles, and each writes its
// slice of O back (a long slice part by part, each part's rows while the next part runs). The
// host plan of the last shape is kept for the next run of the same shape. A GPU holds Q, K, V and O over its slice, and the spanning branches' keys
// that its tiles read packed (only the rows their heads keep), so memory per GPU falls with the
// number of GPUs. With one GPU (or a sequence too short to
// split) no communication runs at all. Host compiler only.

#include <cstddef>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention/attention.h"
#include "kernels/memory/buffer_pool.h"

namespace dilattn::attention::cuda {

class SequenceParallelRunner {
 public:
  // An NCCL communicator over `devices` (distinct CUDA device numbers) and a stream on each.
  // Each device's buffers come from a pool capped at memory::DevicePoolCap(pool_bytes, the memory
  // free on that device when it is created). FAILED_PRECONDITION in a build without CUDA or NCCL,
  // or for a missing device.
  static absl::StatusOr<std::unique_ptr<SequenceParallelRunner>> Create(std::vector<int> devices,
                                                                        size_t pool_bytes = 0);
  virtual ~SequenceParallelRunner() = default;

  virtual int num_devices() const = 0;
  // `plan` must hold one sequence, fp16 or bf16; tensors in host memory (pinned for speed) or in
  // any GPU's memory (copied with cudaMemcpyDefault; their `location` is not consulted). Returns
  // once O is written. A padded plan (padded_plan.h) takes tensors of `host_head_dim` <
  // plan.shape.head_dim: their rows are copied in with zero columns after them, and only those
  // columns of O come back.
  virtual absl::Status Run(const AttentionPlan& plan, const AttentionTensors& host,
                           int64_t host_head_dim) = 0;
  // Tensors of the plan's own head dim.
  absl::Status Run(const AttentionPlan& plan, const AttentionTensors& host) {
    return Run(plan, host, plan.params.head_dim);
  }
  // Frees the device buffers cached between runs, so that other users of these GPUs (a server's
  // executors) get the memory back.
  virtual void ReleaseCachedMemory() = 0;
  // Device bytes the last Run leased on each GPU (tensors, exchange buffers, tile tables).
  virtual std::vector<size_t> LastRunDeviceBytes() const = 0;
  // The cap of each GPU's pool (`pool_bytes`, or 90% of its free memory when the runner was
  // made): a run whose leases (SequenceParallelLeases, rounded to the pool's size classes) pass
  // it cannot run. Any thread.
  virtual std::vector<size_t> PoolCaps() const = 0;
  // Each GPU's pool ("sequence-parallel cuda:N"), for its statistics; they live as long as the
  // runner. Any thread.
  virtual std::vector<const memory::BufferPool*> pools() const = 0;
};

}  // namespace dilattn::attention::cuda
