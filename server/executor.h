#pragma once

// How one device runs batches. The engine thread drives an executor in two steps so that the
// next batch's copies can be issued while the previous batch computes: Start() plans the batch,
// leases its buffers and issues its work (a CPU executor simply does it all); Wait() blocks
// until the outputs are in the requests' responses. Only the engine thread calls them.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/attention/attention.h"
#include "kernels/block_sparse/block_sparse.h"
#include "kernels/memory/buffer_pool.h"
#include "kernels/multihead/multihead.h"
#include "server/request.h"

namespace dilattn::server {

class Model;

// One batch on its way through an executor.
struct Job {
  Model* model = nullptr;
  std::vector<std::unique_ptr<InferenceRequest>> requests;  // all share one batch key
  attention::ProblemShape shape;  // the packed problem, in the requests' dtype
  absl::Time start;               // the engine began the job
  absl::Time issued;  // Start() returned: the device has the job from here (the CPU path: done)
  // The job's phases, shared by its requests in their statistics.
  absl::Duration compute_input, compute_infer, compute_output;
  std::vector<memory::Buffer> leases;  // returned to their pools when the job is destroyed
  int stream = 0;                      // which of the executor's streams it runs on
  bool on_host = false;                // ran on the CPU path (no device work to wait for)
  ExecutionPath path = ExecutionPath::kCpu;  // set by whichever runs it
  std::shared_ptr<void> device_state;  // the executor's own per-job state
  // Whether Start() may wait for pool memory (up to pool_wait). Not while the engine holds a job
  // in flight whose buffers come back only once it is waited for: Start() then fails at once
  // with RESOURCE_EXHAUSTED, and the engine finishes that job and starts this one again.
  bool may_wait = true;
  absl::Time pool_deadline(absl::Duration pool_wait) const {
    return may_wait ? start + pool_wait : absl::InfinitePast();
  }
  ~Job();
};

// What the support check learns while it plans a request, which the batcher needs too: the
// parser keeps it on the request, so that admission plans a request once (a block-sparse layout
// can take a second to build).
struct PlanFacts {
  int64_t kept_pairs = 0;  // block-sparse: InferenceRequest::kept_pairs
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual std::string name() const = 0;
  virtual int cuda_device() const { return -1; }  // the GPU it runs on; -1 for the CPU
  // Whether `r` can run here, by the same selector Start() uses, and what its plan said. Any
  // thread.
  virtual absl::StatusOr<PlanFacts> Supports(const InferenceRequest& r) const = 0;
  virtual std::vector<const memory::BufferPool*> pools() const = 0;
  // Where request tensors are staged (pinned on a GPU) and outputs are leased from. Any thread.
  virtual memory::BufferPool& staging_pool() = 0;
  virtual absl::Status Start(Job& job) = 0;
  virtual absl::Status Wait(Job& job) = 0;
  // After Start() or Wait() failed: OK while the device still works, else the error that left
  // it unusable for the rest of the process (a CUDA error that corrupts its context: an illegal
  // address, a kernel trap, an uncorrectable ECC error, a device fallen off the bus). The
  // engine thread; it waits for the device's work in flight.
  virtual absl::Status CheckDevice() { return absl::OkStatus(); }
  // Frees the device memory its pools cache between jobs (a job across every GPU is about to
  // need it). Only while it runs no job.
  virtual void ReleaseCachedMemory() {}
  // Frees what its pools have cached unused since before `cutoff`, so that memory a burst left
  // behind goes back to the system and to other processes on its GPU. Only while it runs no job:
  // freeing device memory waits for the device. Pools it shares with other executors may be
  // trimmed while those run jobs; only buffers nobody leases are freed. Returns the bytes freed.
  virtual size_t ReleaseIdleMemory(absl::Time /*cutoff*/) { return 0; }
};

// Runs one request across every GPU of the engine at once: sequence parallelism (DESIGN.md
// section 1). The engine gives it the request when no executor runs a job, after releasing their
// cached device memory.
class GangRunner {
 public:
  virtual ~GangRunner() = default;
  // Whether `r` runs across the GPUs (long enough, and what the split kernels run). Any thread.
  virtual bool Takes(const InferenceRequest& r) const = 0;
  // Runs the job's one request and writes its output; returns when done. The engine's thread.
  virtual absl::Status Run(Job& job) = 0;
  virtual void ReleaseCachedMemory() = 0;
  // The pools it leases its own buffers from, for the pool metrics. Any thread.
  virtual std::vector<const memory::BufferPool*> pools() const = 0;
};

// Sequence parallelism over `devices` for single dense sequences of at least `min_tokens` tokens
// in fp16 or bf16; outputs are leased from `staging` (pinned), waiting up to `pool_wait` for
// it as the executors do. Each GPU's own pool is capped at `device_pool_bytes` (0: 90% of its
// free memory), as the executors' are. FAILED_PRECONDITION in a build without CUDA or NCCL.
absl::StatusOr<std::unique_ptr<GangRunner>> CreateSequenceParallelGang(std::vector<int> devices,
                                                                       int64_t min_tokens,
                                                                       memory::BufferPool* staging,
                                                                       absl::Duration pool_wait,
                                                                       size_t device_pool_bytes);

struct ExecutorOptions {
  int cpu_threads = 0;
  size_t host_pool_bytes = size_t{16} << 30;
  size_t device_pool_bytes = 0;  // 0: 90% of the device memory free at start-up
  absl::Duration pool_wait = absl::Seconds(10);
  // GPU: a dilated-attention job of at least this many tokens whose tensors are copied runs in
  // pieces (attention::SplitIntoPieces), each piece's kernel starting once its own inputs have
  // arrived and its output copied back while later pieces compute. 0: never.
  int64_t pipeline_min_tokens = 131072;
};

// Host pools the executors of several GPUs share, so that a request staged before a GPU is
// chosen can run on any of them and each pool is counted once: "pinned" (page-locked, portable
// to every device) and "host" (the CPU path's). Null members are created by the executor.
struct SharedHostPools {
  std::shared_ptr<memory::BufferPool> pinned;
  std::shared_ptr<memory::BufferPool> host;
};

// The CPU path's pool: `host_pool_bytes` of plain host memory.
absl::StatusOr<std::shared_ptr<memory::BufferPool>> CreateHostPool(const ExecutorOptions& options);
// The GPU executors' staging pool: `host_pool_bytes` of pinned, portable host memory.
absl::StatusOr<std::shared_ptr<memory::BufferPool>> CreatePinnedPool(
    const ExecutorOptions& options);

absl::StatusOr<std::unique_ptr<Executor>> CreateCpuExecutor(
    const ExecutorOptions& options, std::shared_ptr<memory::BufferPool> host = nullptr);
// FAILED_PRECONDITION without CUDA or without the device.
absl::StatusOr<std::unique_ptr<Executor>> CreateCudaExecutor(const ExecutorOptions& options,
                                                             int device,
                                                             SharedHostPools shared = {});

// Plans `job.shape` for the requests' operator (their first request's options).
struct JobPlans {
  absl::StatusOr<attention::AttentionPlan> dilated = absl::UnknownError("unset");
  absl::StatusOr<block_sparse::BlockSparsePlan> sparse = absl::UnknownError("unset");
  absl::StatusOr<multihead::MultiheadPlan> multihead = absl::UnknownError("unset");
  absl::Status status(OperatorKind kind) const;  // the plan of that operator's
  PlanFacts facts(OperatorKind kind) const;      // of that operator's plan, once it is ok
};
JobPlans PlanJob(const Job& job, attention::DType dtype);
// The same for one operator and shape (a request's, before it is in a job).
JobPlans PlanOperator(const OperatorOptions& options, const attention::ProblemShape& shape);

// Whether a GPU executor on CUDA device `device` may run the job in place: one request whose Q,
// K, V and output all lie in CUDA shared memory on that device, in the computed dtype (no
// `convert`), so that the kernel reads the client's ranges and writes O into its output range
// with no device-to-device copies (four tensors' worth of traffic, 0.7 ms at N = 128K). The
// ranges must be 16-byte aligned (the kernel's loads), and O must not overlap an input, since O is
// written while other CTAs still read keys; otherwise the job copies as any other.
bool RunsInPlace(const Job& job, bool convert, int device);

// Inputs still being copied out of their messages (InferenceRequest::fill): WaitForInputs blocks
// until every request's are in place, WaitForInputBytes until bytes [0, end) of each packed input
// tensor are (a job in pieces waits for a piece's rows only). Every executor waits before it
// reads a request's inputs.
void WaitForInputs(const Job& job);
void WaitForInputBytes(const Job& job, size_t end);
// Whether none of `requests` has inputs still being copied.
bool InputsInPlace(const std::vector<std::unique_ptr<InferenceRequest>>& requests);

// Whether the CPU path may run the job on the requests' own memory: one request whose tensors
// are aligned to their elements and whose output range, when it has one, overlaps no input;
// otherwise its tensors are copied into leased buffers first. (By then StageHostSharedMemory has
// moved tensors in system shared memory into leases, so the own memory is a message's or a
// lease.)
bool RunsInPlaceOnHost(const Job& job);

// Tensors in system shared memory may lose their pages at any time (the client can shrink the
// object), and the CPU must then not touch them (SIGBUS). Before an executor reads a job's
// inputs with the CPU (the CPU path, or copies from pageable memory, which the CUDA driver does
// with the CPU), this copies every input in a system region (only those not page-locked unless
// `pinned_too`; a GPU's DMA from pinned pages is safe) into the request's `staged` lease from
// `pool`, through CopyGuarded, and points the output in such a region at a lease instead, which
// the engine copies there when the job completes (CompleteHostOutput). A request whose region
// shrank fails alone (`failed`; its staged inputs are zeros) while the job goes on.
absl::Status StageHostSharedMemory(Job& job, memory::BufferPool& pool, bool pinned_too,
                                   absl::Time deadline);
// Whether a request's output lies in a system region over bytes of one of its inputs (perhaps
// through another registration of the same object). A job in pieces copies piece i's output
// while later pieces' inputs are still to be copied, so such a job copies all inputs first.
bool HostOutputOverlapsInputs(const Job& job);
bool HostOutputOverlapsInputs(const InferenceRequest& r);
// The deferred copy of a request's output to its system region, or for regions a GPU used by
// DMA, whether they are still backed; the failure, if any, is the request's.
absl::Status CompleteHostOutput(InferenceRequest& r);

}  // namespace dilattn::server
