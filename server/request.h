#pragma once

// One accepted inference request on its way from a gRPC handler through a model's scheduler to
// an engine. The handler has validated it completely; the tensors are views into its staging
// lease (still being filled while `fill` runs), the heap, or registered shared memory.

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kernels/attention/attention.h"
#include "kernels/memory/buffer_pool.h"
#include "server/input_fill.h"
#include "server/operator_options.h"
#include "server/shared_memory.h"

namespace dilattn::server {

class Model;

// Where an execution computed (dilattn_executions_total's path label): on a GPU at the request's
// head dim, on a GPU at a padded one (a head dim without a kernel), on the CPU path (a CPU server,
// or a shape a GPU server's kernels do not take), or split across GPUs (sequence parallelism).
enum class ExecutionPath { kGpu, kGpuPadded, kCpu, kSplit };
inline constexpr int kExecutionPaths = 4;

// Durations of one request for statistics (the batch's compute phases are shared by its members).
struct RequestTimings {
  absl::Duration queue;
  absl::Duration compute_input;
  absl::Duration compute_infer;
  absl::Duration compute_output;
};

struct InferenceRequest {
  Model* model = nullptr;
  std::string id;

  OperatorOptions options;
  std::string batch_key;  // requests with equal keys may share one execution
  attention::DType dtype = attention::DType::kFloat32;
  int64_t batch = 0, seq_len = 0, heads = 0, head_dim = 0;
  size_t tensor_bytes = 0;

  absl::string_view q, k, v;  // the multihead module's X is `q`; k and v stay empty
  memory::Buffer input;  // Q, K, V side by side, leased from the engine's staging pool
  std::string owned[3];  // or Q, K, V on the heap (typed contents, or the pool was full)
  // Set while the raw contents are still being copied into `input` (server/input_fill.h): an
  // executor waits for the rows it reads. Declared after the memory it fills, so that it is
  // destroyed, and its copy stopped, first.
  std::unique_ptr<InputFill> fill;
  memory::Buffer output;  // O, leased and filled by the engine; tensor_bytes long

  // Tensors in registered shared memory (Triton's extension). An input there is viewed in place:
  // where input_device[i] >= 0 its view holds a device pointer on that CUDA device, which only a
  // GPU executor may touch. An output there is written to output_target, and no `output` is
  // leased.
  int input_device[3] = {-1, -1, -1};
  struct OutputTarget {
    std::byte* data = nullptr;
    int device = -1;  // -1: host memory
  };
  OutputTarget output_target;
  std::vector<std::shared_ptr<const SharedMemoryRegion>> regions;  // kept mapped until done
  // The system region each of Q, K, V and O lies in (null elsewhere). The CPU touches those only
  // through CopyGuarded: StageHostSharedMemory (server/executor.h) copies such inputs into
  // `staged` and moves such an output to `output`, to be copied to `deferred_output` when the
  // job completes.
  const SharedMemoryRegion* host_region[4] = {nullptr, nullptr, nullptr, nullptr};
  memory::Buffer staged;
  std::byte* deferred_output = nullptr;
  // Set when this request alone failed inside a job that went on (its region shrank).
  absl::Status failed;

  // Block-sparse: the kept block pairs of its sequences (PlanBlockSparse's kept_pairs), which a
  // batch's sum must keep within block_sparse::kMaxKeptPairs; 0 for other operators.
  int64_t kept_pairs = 0;
  int priority = 1;  // 1 is served first
  absl::Time arrival;   // the handler received the message (before parsing it)
  absl::Time enqueued;  // it entered the model's queue
  absl::Time deadline = absl::InfiniteFuture();
  // Set by the RPC layer when the client cancels or the call's deadline passes.
  std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);

  // Called exactly once, with OK after the output is written or with the reason it never will
  // be. Runs on a scheduler or engine thread, or on the handler's thread for rejections.
  absl::AnyInvocable<void(InferenceRequest& request, const absl::Status& status,
                          const RequestTimings& timings)>
      done;

  int64_t tokens() const { return batch * seq_len; }
  // The tensors the caller sent: Q, K, V, or the multihead module's X alone.
  int inputs() const { return options.kind == OperatorKind::kMultihead ? 1 : 3; }
  absl::string_view tensor(int i) const { return i == 0 ? q : i == 1 ? k : v; }
  bool touches_device_memory() const {
    return input_device[0] >= 0 || input_device[1] >= 0 || input_device[2] >= 0 ||
           output_target.device >= 0;
  }
};

}  // namespace dilattn::server
