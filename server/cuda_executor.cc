// The GPU executor: dilated and block-sparse attention in fp16/bf16 on the fused kernels, the
// multihead module on cuBLASLt around them (fp32 requests are converted to fp16 on the device,
// a request refused if one of its values overflows fp16), everything the GPU backends do not cover
// on the CPU path. Two streams alternate between consecutive jobs, so a job's host-to-device copies
// overlap the previous job's kernel; a long dilated-attention job runs in pieces, so that its
// copies in and out overlap its own kernels too. Buffers come from a device pool and a pinned
// staging pool. A lone request whose tensors all lie in CUDA shared memory on this device runs in
// place, on the client's ranges.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "kernels/attention/cuda/launch.h"
#include "kernels/attention/gpu_tiles.h"
#include "kernels/attention/padded_plan.h"
#include "kernels/common/clock.h"
#include "kernels/memory/allocator.h"
#include "server/executor.h"
#include "server/log.h"

namespace dilattn::server {
namespace {

absl::Status Cuda(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

// The device-side state of one job (Job::device_state).
struct GpuJob {
  // A job in pieces: `copied` is when the first piece's inputs are in, `computed` when the last
  // piece's kernel is done, so its phases still add up to its time.
  cudaEvent_t begin = nullptr, copied = nullptr, computed = nullptr, done = nullptr;
  std::vector<cudaEvent_t> piece_events;  // per piece: inputs in, kernel done
  // Pinned: the job's FlagBlock, whose flags come back from the device after its conversions.
  unsigned char* flags_host = nullptr;
  // The host's part of "input": planning, leases, issuing copies. In pieces it ends where the
  // copies begin: the rest of Start() waits for rows still being copied out of messages and
  // issues later pieces beside the GPU's work.
  absl::Duration host_work;
  ~GpuJob() {
    for (cudaEvent_t e : {begin, copied, computed, done}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    for (cudaEvent_t e : piece_events) cudaEventDestroy(e);
  }
};

// How a job's fp32 <-> fp16 conversions report per request (attention::cuda::ConversionFlags):
// one int per request, zeros on the way in and the conversions' bits on the way out, then the
// requests' element bounds within each packed tensor. Written into a pinned lease, copied to the
// device with the inputs; only the flags come back.
struct FlagBlock {
  static size_t BoundsOffset(size_t requests) { return (requests * sizeof(int) + 7) / 8 * 8; }
  static size_t Bytes(size_t requests) {
    return BoundsOffset(requests) + (requests + 1) * sizeof(int64_t);
  }
  static size_t FlagBytes(size_t requests) { return requests * sizeof(int); }
  static void Write(const Job& job, size_t element_bytes, unsigned char* block) {
    std::memset(block, 0, FlagBytes(job.requests.size()));
    auto* bounds = reinterpret_cast<int64_t*>(block + BoundsOffset(job.requests.size()));
    bounds[0] = 0;
    for (size_t i = 0; i < job.requests.size(); ++i) {
      bounds[i + 1] =
          bounds[i] + static_cast<int64_t>(job.requests[i]->tensor_bytes / element_bytes);
    }
  }
  // The block on the device, for a conversion of the packed tensors' elements from `first` on.
  static attention::cuda::ConversionFlags OnDevice(const Job& job, void* block, int64_t first) {
    auto* bytes = static_cast<unsigned char*>(block);
    return {reinterpret_cast<int*>(bytes),
            reinterpret_cast<const int64_t*>(bytes + BoundsOffset(job.requests.size())),
            static_cast<int>(job.requests.size()), first};
  }
  // What the flags say of request i: refused when its fp32 inputs do not fit fp16, or when its
  // output came out non-finite from finite inputs.
  static absl::Status Verdict(const unsigned char* block, size_t i) {
    int flags = 0;
    std::memcpy(&flags, block + i * sizeof(int), sizeof(int));
    if ((flags & attention::cuda::kFp16InputOverflow) != 0) {
      return absl::InvalidArgumentError(
          "an FP32 input holds a value beyond fp16's range (|x| > 65504); the GPU computes in "
          "fp16 for FP32 requests: send FP16 or BF16, or scale the inputs");
    }
    // Finite inputs, yet inf or NaN out: a value between the steps (a projection of the
    // multihead module) left fp16's range, where the request's own fp32 would have held it.
    if ((flags & attention::cuda::kFp16NonFiniteOutput) != 0 &&
        (flags & attention::cuda::kFp16NonFiniteInput) == 0) {
      return absl::InvalidArgumentError(
          "the GPU computes FP32 requests in fp16, and a value inside this computation exceeded "
          "fp16's range (|x| > 65504), so the output would hold infinities: send BF16, or scale "
          "the inputs or weights");
    }
    return absl::OkStatus();
  }
};

// A job's copies between its requests and its packed device tensors, issued as one
// cudaMemcpyBatchAsync: a job of a few small requests has one copy per request and tensor, and
// issuing them one call at a time cost the engine thread about 5 us each.
class CopyBatch {
 public:
  void Add(void* dst, const void* src, size_t bytes) {
    dsts_.push_back(dst);
    srcs_.push_back(src);
    sizes_.push_back(bytes);
  }

  // Sources are read in stream order, as cudaMemcpyAsync reads them: a copy out reads what the
  // kernel before it wrote. As with cudaMemcpyDefault, the pointers say where they are.
  // A batch the driver refuses (a pair of pointers it cannot batch) goes again one copy at a
  // time, so that only a copy cudaMemcpyAsync refuses too fails the job.
  absl::Status Issue(cudaStream_t stream, absl::string_view what) {
    if (dsts_.size() > 1) {
      cudaMemcpyAttributes attrs{};
      attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      size_t first = 0;
      if (cudaMemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(), dsts_.size(), &attrs,
                               &first, 1, stream) == cudaSuccess) {
        return absl::OkStatus();
      }
      cudaGetLastError();
    }
    for (size_t i = 0; i < dsts_.size(); ++i) {
      if (absl::Status s =
              Cuda(cudaMemcpyAsync(dsts_[i], srcs_[i], sizes_[i], cudaMemcpyDefault, stream), what);
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }

 private:
  absl::InlinedVector<void*, 16> dsts_;
  absl::InlinedVector<const void*, 16> srcs_;
  absl::InlinedVector<size_t, 16> sizes_;
};

// Bytes [begin, end) of the job's packed tensor `t` (0-2: Q, K, V) from the requests to `dst` +
// begin, request by request.
void AddCopiesIn(CopyBatch& batch, const Job& job, int t, unsigned char* dst, size_t begin,
                 size_t end) {
  size_t at = 0;
  for (const auto& r : job.requests) {
    const absl::string_view src = r->tensor(t);
    const size_t from = std::max(begin, at), to = std::min(end, at + src.size());
    if (from < to) batch.Add(dst + from, src.data() + (from - at), to - from);
    at += src.size();
  }
}
absl::Status CopyIn(const Job& job, int t, unsigned char* dst, size_t begin, size_t end,
                    cudaStream_t stream) {
  CopyBatch batch;
  AddCopiesIn(batch, job, t, dst, begin, end);
  return batch.Issue(stream, "copy to device");
}

// Where a request's output goes: its shared-memory target, else its lease.
void* OutputOf(InferenceRequest& r) {
  return r.output_target.data != nullptr ? static_cast<void*>(r.output_target.data)
                                         : r.output.data();
}

// Bytes [begin, end) of the packed output `src` to the requests' outputs (their leases or
// shared-memory targets).
void AddCopiesOut(CopyBatch& batch, const Job& job, const unsigned char* src, size_t begin,
                  size_t end) {
  size_t at = 0;
  for (const auto& r : job.requests) {
    const size_t from = std::max(begin, at), to = std::min(end, at + r->tensor_bytes);
    if (from < to) {
      batch.Add(static_cast<unsigned char*>(OutputOf(*r)) + (from - at), src + from, to - from);
    }
    at += r->tensor_bytes;
  }
}
absl::Status CopyOut(const Job& job, const unsigned char* src, size_t begin, size_t end,
                     cudaStream_t stream) {
  CopyBatch batch;
  AddCopiesOut(batch, job, src, begin, end);
  return batch.Issue(stream, "copy out");
}

// Rows of `row` bytes `pitch` apart on the device (a padded head dim); the requests' rows are
// packed.
struct Pitch {
  size_t row, pitch;
};

// The job's packed tensor `t` from the requests into the device tensor `dst` of pitched rows, one
// 2-D copy per request (cudaMemcpyBatchAsync copies only contiguous ranges).
absl::Status CopyPaddedIn(const Job& job, int t, unsigned char* dst, Pitch p, cudaStream_t stream) {
  for (const auto& r : job.requests) {
    const absl::string_view src = r->tensor(t);
    const size_t rows = src.size() / p.row;
    if (absl::Status s = Cuda(cudaMemcpy2DAsync(dst, p.pitch, src.data(), p.row, p.row, rows,
                                                cudaMemcpyDefault, stream),
                              "copy to device");
        !s.ok()) {
      return s;
    }
    dst += rows * p.pitch;
  }
  return absl::OkStatus();
}

// The pitched output rows back to the requests' outputs, one 2-D copy per request.
absl::Status CopyPaddedOut(const Job& job, const unsigned char* src, Pitch p, cudaStream_t stream) {
  for (const auto& r : job.requests) {
    const size_t rows = r->tensor_bytes / p.row;
    if (absl::Status s = Cuda(cudaMemcpy2DAsync(OutputOf(*r), p.row, src, p.pitch, p.row, rows,
                                                cudaMemcpyDefault, stream),
                              "copy out");
        !s.ok()) {
      return s;
    }
    src += rows * p.pitch;
  }
  return absl::OkStatus();
}

class CudaExecutor final : public Executor {
 public:
  CudaExecutor(int device, const ExecutorOptions& options, SharedHostPools shared)
      : device_(device), options_(options), shared_(std::move(shared)) {}
  ~CudaExecutor() override {
    cudaSetDevice(device_);
    for (cudaStream_t s : {streams_[0], streams_[1], copy_in_, copy_out_}) {
      if (s != nullptr) {
        cudaStreamSynchronize(s);
        cudaStreamDestroy(s);
      }
    }
  }

  absl::Status Init() {
    if (absl::Status s = Cuda(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    for (cudaStream_t* stream : {&copy_in_, &copy_out_}) {
      if (absl::Status s = Cuda(cudaStreamCreateWithFlags(stream, cudaStreamNonBlocking), "stream");
          !s.ok()) {
        return s;
      }
    }
    for (int i = 0; i < 2; ++i) {
      if (absl::Status s = Cuda(cudaStreamCreateWithFlags(&streams_[i], cudaStreamNonBlocking),
                                "stream");
          !s.ok()) {
        return s;
      }
      absl::StatusOr<std::unique_ptr<attention::AttentionBackend>> gpu =
          attention::CreateCudaBackend({device_, streams_[i], tile_cache_});
      if (!gpu.ok()) return gpu.status();
      gpu_[i] = *std::move(gpu);
      absl::StatusOr<std::unique_ptr<block_sparse::BlockSparseBackend>> sparse =
          block_sparse::CreateCudaBlockSparseBackend({device_, streams_[i]});
      if (!sparse.ok()) return sparse.status();
      sparse_gpu_[i] = *std::move(sparse);
      // Without cuBLAS on this machine the multihead module runs on the CPU path instead.
      absl::StatusOr<std::unique_ptr<multihead::MultiheadBackend>> multihead =
          multihead::CreateCudaMultiheadBackend({device_, streams_[i]});
      if (multihead.ok()) {
        multihead_gpu_[i] = *std::move(multihead);
      } else if (i == 0) {
        LogWarning("cuda executor: device %d: multihead models run on the CPU path: %s", device_,
                   multihead.status().ToString());
      }
    }
    absl::StatusOr<std::unique_ptr<Executor>> cpu = CreateCpuExecutor(options_, shared_.host);
    if (!cpu.ok()) return cpu.status();
    cpu_ = *std::move(cpu);
    size_t free_bytes = 0, total_bytes = 0;
    if (absl::Status s = Cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
        !s.ok()) {
      return s;
    }
    const size_t device_cap = memory::DevicePoolCap(options_.device_pool_bytes, free_bytes);
    absl::StatusOr<std::unique_ptr<memory::Allocator>> device_alloc =
        memory::NewCudaDeviceAllocator(device_);
    if (!device_alloc.ok()) return device_alloc.status();
    absl::StatusOr<std::unique_ptr<memory::BufferPool>> device_pool = memory::BufferPool::Create(
        {absl::StrCat("cuda:", device_), device_cap}, *std::move(device_alloc));
    if (!device_pool.ok()) return device_pool.status();
    device_pool_ = *std::move(device_pool);
    if (shared_.pinned != nullptr) {
      pinned_pool_ = shared_.pinned;
    } else {
      absl::StatusOr<std::shared_ptr<memory::BufferPool>> pinned = CreatePinnedPool(options_);
      if (!pinned.ok()) return pinned.status();
      pinned_pool_ = *std::move(pinned);
    }
    LogInfo("cuda executor: device %d, %s, device pool cap %d MiB", device_,
            std::string(gpu_[0]->name()), static_cast<int>(device_cap >> 20));
    for (const auto& [variable, fault, what] :
         {std::tuple{"DILATTN_TEST_TRAP_DEVICE", Fault::kTrap,
                     "traps, leaving the device unusable"},
          std::tuple{"DILATTN_TEST_HANG_DEVICE", Fault::kHang,
                     "runs for 20 seconds, as on a hung device"}}) {
      if (const char* named = std::getenv(variable);
          named != nullptr && named == std::to_string(device_)) {
        fault_ = fault;
        LogWarning(
            "cuda executor: device %d: %s is set: its first GPU job launches a kernel that %s "
            "(fault injection, for tests)",
            device_, variable, what);
      }
    }
    return absl::OkStatus();
  }

  // A failed job's error may have left the context corrupted (sticky): every later call then
  // fails with it, a synchronisation included, where a non-sticky error (a refused launch, out of
  // memory) is cleared by cudaGetLastError and the synchronisation succeeds.
  absl::Status CheckDevice() override {
    cudaSetDevice(device_);
    cudaGetLastError();
    const cudaError_t err = cudaDeviceSynchronize();
    if (err == cudaSuccess) return absl::OkStatus();
    return absl::InternalError(
        absl::StrCat(cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
  }

  std::string name() const override {
    return absl::StrCat(gpu_[0]->name(), " (cuda:", device_, "), ", cpu_->name(), " fallback");
  }

  int cuda_device() const override { return device_; }
  memory::BufferPool& staging_pool() override { return *pinned_pool_; }

  std::vector<const memory::BufferPool*> pools() const override {
    std::vector<const memory::BufferPool*> out = {device_pool_.get(), pinned_pool_.get()};
    for (const memory::BufferPool* p : cpu_->pools()) out.push_back(p);
    return out;
  }

  // The one selector: the GPU backends when they take the plan (in the computed dtype), else
  // the CPU path. The plan's status when it is not valid.
  absl::StatusOr<bool> OnGpu(const JobPlans& plans, OperatorKind kind) const {
    if (absl::Status s = plans.status(kind); !s.ok()) return s;
    switch (kind) {
      case OperatorKind::kDilatedAttention:
        return gpu_[0]->Supports(*plans.dilated).ok();
      case OperatorKind::kBlockSparse:
        return sparse_gpu_[0]->Supports(*plans.sparse).ok();
      case OperatorKind::kMultihead:
        return multihead_gpu_[0] != nullptr && multihead_gpu_[1] != nullptr &&
               multihead_gpu_[0]->Supports(*plans.multihead).ok();
    }
    return absl::InternalError("unknown operator");
  }

  // A dilated or block-sparse plan whose head dim has no kernel runs padded (padded_plan.h).
  // NOT_FOUND when the plan runs as it is or no head dim takes it.
  absl::StatusOr<attention::AttentionPlan> PaddedPlan(const attention::AttentionPlan& plan) const {
    return attention::PaddedAttentionPlan(plan, *gpu_[0]);
  }
  absl::StatusOr<block_sparse::BlockSparsePlan> PaddedPlan(
      const block_sparse::BlockSparsePlan& plan) const {
    block_sparse::BlockSparseOptions options = plan.options;
    options.softmax_scale = plan.scale;
    return attention::PadHeadDim(
        plan,
        [&](const block_sparse::BlockSparsePlan& p) { return sparse_gpu_[0]->Supports(p).ok(); },
        [&](const attention::ProblemShape& shape) {
          return block_sparse::PlanBlockSparse(options, shape);
        });
  }
  // Puts the padded plan in place of the job's dilated or block-sparse plan where one applies, so
  // that the selector (OnGpu) and the run see it; returns the head dim it runs as, 0 if none.
  // The multihead backend pads inside itself (its projections write the padded rows).
  int64_t PadToKernel(JobPlans& plans, OperatorKind kind) const {
    auto pad = [this](auto& plan) -> int64_t {
      if (!plan.ok()) return 0;
      auto padded = PaddedPlan(*plan);
      if (!padded.ok()) return 0;
      plan = *std::move(padded);
      return plan->shape.head_dim;
    };
    if (kind == OperatorKind::kDilatedAttention) return pad(plans.dilated);
    if (kind == OperatorKind::kBlockSparse) return pad(plans.sparse);
    return 0;
  }

  absl::StatusOr<PlanFacts> Supports(const InferenceRequest& r) const override {
    JobPlans plans = PlanOperator(r.options, attention::DenseShape(ComputeType(r.dtype), r.batch,
                                                                   r.seq_len, r.heads, r.head_dim));
    PadToKernel(plans, r.options.kind);
    absl::StatusOr<bool> gpu = OnGpu(plans, r.options.kind);
    if (!gpu.ok()) return gpu.status();
    return *gpu ? plans.facts(r.options.kind) : cpu_->Supports(r);
  }

  absl::Status Start(Job& job) override {
    const attention::DType in_type = job.shape.dtype;
    const attention::DType compute = ComputeType(in_type);
    const bool convert = in_type != compute;
    // Planned once for the job (a block-sparse layout is as long as its kept pairs).
    JobPlans plans = PlanJob(job, compute);
    const OperatorKind kind = job.requests.front()->options.kind;
    const int64_t pad_dim = PadToKernel(plans, kind);  // 0: the job's own head dim has a kernel
    absl::StatusOr<bool> gpu = OnGpu(plans, kind);
    if (!gpu.ok()) return gpu.status();
    if (!*gpu) return cpu_->Start(job);
    // The multihead module pads inside itself.
    const bool padded = pad_dim > 0 || (kind == OperatorKind::kMultihead &&
                                        multihead_gpu_[0]->RunsPadded(*plans.multihead));
    job.path = padded ? ExecutionPath::kGpuPadded : ExecutionPath::kGpu;
    if (absl::Status s = Cuda(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    // Pageable system regions: the driver would copy from them with the CPU.
    if (absl::Status s = StageHostSharedMemory(job, *pinned_pool_, /*pinned_too=*/false,
                                               job.pool_deadline(options_.pool_wait));
        !s.ok()) {
      return s;
    }
    if (pad_dim > 0 && !logged_padding_) {
      LogInfo(
          "cuda executor: device %d: head dims without a kernel run padded (the first: %d as %d)",
          device_, job.shape.head_dim, pad_dim);
      logged_padding_ = true;
    }
    const bool in_place = pad_dim == 0 && RunsInPlace(job, convert, device_);
    size_t dev_bytes = 0, workspace_bytes = 0;
    std::vector<Piece> pieces;
    bool row_parts = false;
    switch (kind) {
      case OperatorKind::kDilatedAttention: {
        dev_bytes = plans.dilated->tensor_bytes;
        // In pieces or row parts, outputs go back while later inputs are still to come: not
        // over them.
        const bool in_launches = !in_place && pad_dim == 0 && !HostOutputOverlapsInputs(job);
        if (in_launches) {
          absl::StatusOr<std::vector<Piece>> split = Pieces(*plans.dilated, &workspace_bytes);
          if (!split.ok()) return split.status();
          pieces = *std::move(split);
        }
        // In pieces, the workspace holds one piece's tile list at a time.
        if (pieces.empty()) workspace_bytes = gpu_[0]->WorkspaceBytes(*plans.dilated);
        // Long, yet no cut leaves independent problems (a segment as long as the sequence):
        // the one plan in launches over parts of its rows instead (IssueRowParts).
        row_parts = in_launches && pieces.empty() && options_.pipeline_min_tokens > 0 &&
                    plans.dilated->params.total_tokens >= options_.pipeline_min_tokens;
        break;
      }
      case OperatorKind::kBlockSparse:
        dev_bytes = plans.sparse->tensor_bytes;
        workspace_bytes = sparse_gpu_[0]->WorkspaceBytes(*plans.sparse);
        break;
      case OperatorKind::kMultihead:
        dev_bytes = plans.multihead->tensor_bytes;
        workspace_bytes = multihead_gpu_[0]->WorkspaceBytes(*plans.multihead);
        break;
    }
    // The requests' packed tensors, in the computed type: the device tensors less their padding.
    const size_t job_bytes =
        pad_dim > 0 ? dev_bytes / static_cast<size_t>(pad_dim) * job.shape.head_dim : dev_bytes;
    const int inputs = job.requests.front()->inputs();
    const size_t in_bytes =
        job_bytes / attention::DTypeSize(compute) * attention::DTypeSize(in_type);
    // A small fp32 job stages all its inputs side by side, so that they go in one batch of
    // copies and one conversion; a large one stages them in turn through one tensor's room,
    // where a few calls more cost nothing against its copies.
    const bool stage_all = convert && static_cast<size_t>(inputs) * in_bytes <= kStageAllBytes;
    const absl::Time deadline = job.pool_deadline(options_.pool_wait);
    const size_t tensor_lease = in_place ? size_t{1} : dev_bytes;
    const size_t kv_lease = inputs == 3 ? tensor_lease : size_t{1};

    auto state = std::make_unique<GpuJob>();
    // Device: Q, K, V, O (X and Y for the multihead module) unless the job runs in place, the
    // workspace, for fp32 requests the fp32 staging to convert through, and the flag block (it
    // is pinned on the host too). Host: each request's output lease (pinned), which the response
    // sends without another copy; the inputs are already staged in pinned leases.
    const size_t flag_bytes = FlagBlock::Bytes(job.requests.size());
    absl::StatusOr<memory::Buffer> flag = pinned_pool_->Acquire(flag_bytes, deadline);
    if (!flag.ok()) return flag.status();
    std::vector<memory::Buffer> dev;
    for (size_t bytes :
         {tensor_lease, kv_lease, kv_lease, tensor_lease, std::max<size_t>(1, workspace_bytes),
          convert ? (stage_all ? static_cast<size_t>(inputs) : size_t{1}) * in_bytes : size_t{1},
          flag_bytes}) {
      absl::StatusOr<memory::Buffer> b = device_pool_->Acquire(bytes, deadline);
      if (!b.ok()) return b.status();
      dev.push_back(*std::move(b));
    }
    for (const auto& r : job.requests) {
      if (r->output_target.data != nullptr) continue;  // written straight to shared memory
      absl::StatusOr<memory::Buffer> out = pinned_pool_->Acquire(r->tensor_bytes, deadline);
      if (!out.ok()) return out.status();
      r->output = *std::move(out);
    }
    state->flags_host = static_cast<unsigned char*>(flag->data());
    FlagBlock::Write(job, attention::DTypeSize(in_type), state->flags_host);

    job.stream = next_stream_;
    next_stream_ ^= 1;
    cudaStream_t stream = streams_[job.stream];
    // A trap before the job's work, so that the job fails with it.
    if (fault_ == Fault::kTrap) {
      fault_ = Fault::kNone;
      if (absl::Status s = Cuda(static_cast<cudaError_t>(attention::cuda::LaunchTrap(stream)),
                                "fault injection");
          !s.ok()) {
        return s;
      }
    }
    for (cudaEvent_t* e : {&state->begin, &state->copied, &state->computed, &state->done}) {
      if (absl::Status s = Cuda(cudaEventCreate(e), "event"); !s.ok()) return s;
    }
    if (row_parts || !pieces.empty()) {
      absl::Status s = row_parts ? IssueRowParts(job, *plans.dilated, dev, convert, stream, *state)
                                 : IssuePieces(job, pieces, dev, convert, stream, *state);
      FinishStart(job, std::move(state), *std::move(flag), dev);
      if (!s.ok()) {
        for (cudaStream_t st : {copy_in_, stream, copy_out_}) cudaStreamSynchronize(st);
      }
      return s;
    }
    WaitForInputs(job);
    absl::Status s = Cuda(cudaEventRecord(state->begin, stream), "event");
    const attention::cuda::ConversionFlags flags = FlagBlock::OnDevice(job, dev[6].data(), 0);
    // Each request's tensors go straight to their place in the packed device tensors (through
    // the fp32 buffer when converting). The pointers say where they are: the pinned staging
    // lease, a system shared-memory region, or a CUDA one on any device. All the inputs go in
    // one batch, except a large fp32 job's, one tensor per batch and conversion.
    const int per_batch = convert && !stage_all ? 1 : inputs;
    auto* fp32 = static_cast<unsigned char*>(dev[5].data());
    // A padded head dim (PaddedPlan): rows of D values in the requests, of pad_dim on the device.
    const int64_t head_dim = job.shape.head_dim;
    const attention::cuda::HalfRows half_rows{head_dim, pad_dim > 0 ? pad_dim : head_dim};
    const size_t compute_size = attention::DTypeSize(compute);
    const Pitch pitch{static_cast<size_t>(half_rows.row) * compute_size,
                      static_cast<size_t>(half_rows.pitch) * compute_size};
    if (pad_dim > 0) {
      // Q's and K's extra columns are zeros; V's, like O's, only reach O's extra columns.
      const size_t rows = job_bytes / pitch.row;
      for (int t = 0; t < 2 && s.ok(); ++t) {
        s = Cuda(cudaMemset2DAsync(static_cast<unsigned char*>(dev[t].data()) + pitch.row,
                                   pitch.pitch, 0, pitch.pitch - pitch.row, rows, stream),
                 "memset");
      }
    }
    for (int first = 0; first < inputs && s.ok() && !in_place; first += per_batch) {
      if (pad_dim > 0 && !convert) {
        for (int t = first; t < first + per_batch && s.ok(); ++t) {
          s = CopyPaddedIn(job, t, static_cast<unsigned char*>(dev[t].data()), pitch, stream);
        }
        continue;
      }
      CopyBatch batch;
      if (convert && first == 0) batch.Add(dev[6].data(), state->flags_host, flag_bytes);
      void* halves[attention::cuda::kMaxConvertTensors] = {};
      for (int t = first; t < first + per_batch; ++t) {
        const size_t staged = stage_all ? static_cast<size_t>(t) * in_bytes : 0;
        AddCopiesIn(batch, job, t,
                    convert ? fp32 + staged : static_cast<unsigned char*>(dev[t].data()), 0,
                    in_bytes);
        halves[t - first] = dev[t].data();
      }
      s = batch.Issue(stream, "copy to device");
      if (s.ok() && convert) {
        s = Cuda(static_cast<cudaError_t>(attention::cuda::LaunchFloatToHalf(
                     reinterpret_cast<const float*>(fp32), halves, per_batch,
                     static_cast<int64_t>(in_bytes / sizeof(float)), half_rows, flags, stream)),
                 "fp32 to fp16");
      }
    }
    if (s.ok()) s = Cuda(cudaEventRecord(state->copied, stream), "event");
    const DeviceLoc loc = DeviceLoc::Cuda(device_);
    if (s.ok()) {
      const InferenceRequest& r = *job.requests.front();
      auto tensor = [&](int t) -> void* {
        if (!in_place) return dev[t].data();
        if (t == 3) return r.output_target.data;
        return const_cast<char*>(r.tensor(t).data());
      };
      const attention::AttentionTensors tensors{{tensor(0), dev_bytes, loc},
                                                {tensor(1), dev_bytes, loc},
                                                {tensor(2), dev_bytes, loc},
                                                {tensor(3), dev_bytes, loc}};
      const attention::TensorRef workspace{dev[4].data(), dev[4].size(), loc};
      switch (kind) {
        case OperatorKind::kDilatedAttention:
          s = gpu_[job.stream]->Run(*plans.dilated, tensors, workspace);
          break;
        case OperatorKind::kBlockSparse:
          s = sparse_gpu_[job.stream]->Run(*plans.sparse, tensors, workspace);
          break;
        case OperatorKind::kMultihead:
          s = multihead_gpu_[job.stream]->Run(*plans.multihead, {tensors.q, tensors.o}, workspace);
          break;
      }
    }
    if (s.ok()) s = Cuda(cudaEventRecord(state->computed, stream), "event");
    if (s.ok() && convert) {
      s = Cuda(static_cast<cudaError_t>(attention::cuda::LaunchHalfToFloat(
                   dev[3].data(), static_cast<float*>(dev[5].data()),
                   static_cast<int64_t>(in_bytes / sizeof(float)), half_rows, flags, stream)),
               "fp16 to fp32");
    }
    if (s.ok() && pad_dim > 0 && !convert) {
      s = CopyPaddedOut(job, static_cast<const unsigned char*>(dev[3].data()), pitch, stream);
    } else if (s.ok() && !in_place) {
      CopyBatch batch;
      AddCopiesOut(batch, job, convert ? fp32 : static_cast<const unsigned char*>(dev[3].data()), 0,
                   in_bytes);
      if (convert) {
        batch.Add(state->flags_host, dev[6].data(), FlagBlock::FlagBytes(job.requests.size()));
      }
      s = batch.Issue(stream, "copy out");
    }
    // A hang after the job's work is issued, where a hung kernel of its own would hold the
    // stream; earlier, a later call of this Start() could wait for the device (a first pinned
    // allocation does).
    if (s.ok() && fault_ == Fault::kHang) {
      fault_ = Fault::kNone;
      s = Cuda(
          static_cast<cudaError_t>(attention::cuda::LaunchSpin(int64_t{20'000'000'000}, stream)),
          "fault injection");
    }
    if (s.ok()) s = Cuda(cudaEventRecord(state->done, stream), "event");
    state->host_work = MonotonicNow() - job.start;
    FinishStart(job, std::move(state), *std::move(flag), dev);
    if (!s.ok()) {
      cudaStreamSynchronize(stream);
      return s;
    }
    return absl::OkStatus();
  }

  void ReleaseCachedMemory() override { device_pool_->Trim(); }

  // The pinned pool and the CPU path's host pool may be shared with other GPUs' executors; the
  // pools are thread-safe, and they free only buffers nobody leases.
  size_t ReleaseIdleMemory(absl::Time cutoff) override {
    // The tile lists kept for recent shapes go too: planned again in microseconds, they may
    // hold megabytes for long sequences.
    return device_pool_->ReleaseIdle(cutoff) + pinned_pool_->ReleaseIdle(cutoff) +
           cpu_->ReleaseIdleMemory(cutoff) + tile_cache_->Clear();
  }

  absl::Status Wait(Job& job) override {
    if (job.on_host) return cpu_->Wait(job);
    auto* state = static_cast<GpuJob*>(job.device_state.get());
    if (state == nullptr) return absl::InternalError("GPU job without device state");
    if (absl::Status s = Cuda(cudaEventSynchronize(state->done), "GPU job"); !s.ok()) {
      LogError("GPU job failed: %s", s.ToString());
      return s;
    }
    // A request whose values do not fit fp16 fails alone; the rest of its batch is answered.
    for (size_t i = 0; i < job.requests.size(); ++i) {
      InferenceRequest& r = *job.requests[i];
      if (absl::Status v = FlagBlock::Verdict(state->flags_host, i); !v.ok() && r.failed.ok()) {
        r.failed = std::move(v);
      }
    }
    float copy_ms = 0, kernel_ms = 0, out_ms = 0;
    cudaEventElapsedTime(&copy_ms, state->begin, state->copied);
    cudaEventElapsedTime(&kernel_ms, state->copied, state->computed);
    cudaEventElapsedTime(&out_ms, state->computed, state->done);
    job.compute_input = state->host_work + absl::Milliseconds(copy_ms);
    job.compute_infer = absl::Milliseconds(kernel_ms);
    job.compute_output = absl::Milliseconds(out_ms);
    return absl::OkStatus();
  }

 private:
  static attention::DType ComputeType(attention::DType t) {
    return t == attention::DType::kFloat32 ? attention::DType::kFloat16 : t;
  }

  static constexpr int64_t kRowParts = 8;  // IssueRowParts: about as many as pieces
  static attention::cuda::HalfRows Packed(int64_t row) { return {row, row}; }
  static constexpr size_t kStageAllBytes = size_t{64} << 20;  // fp32 inputs staged side by side

  // One piece of a job and the plan of its shape (pieces of one shape share a plan).
  struct Piece {
    int64_t row_begin, row_end;
    std::shared_ptr<const attention::AttentionPlan> plan;
  };

  // The job's pieces when it is long enough to run in them (else none): about an eighth of it
  // each, at least a quarter of pipeline_min_tokens, so that the first piece's inputs (all the
  // first kernel waits for) are a small part of the copy and every piece's kernel still fills
  // the GPU. With pieces, `workspace_bytes` becomes the largest workspace a piece's shape needs.
  absl::StatusOr<std::vector<Piece>> Pieces(const attention::AttentionPlan& plan,
                                            size_t* workspace_bytes) const {
    const int64_t total = plan.params.total_tokens;
    const int64_t min_tokens = options_.pipeline_min_tokens;
    if (min_tokens <= 0 || total < min_tokens) return std::vector<Piece>{};
    const int64_t target = std::max((min_tokens + 3) / 4, (total + 7) / 8);
    const std::vector<attention::PlanPiece> split = attention::SplitIntoPieces(plan, target);
    if (split.size() < 2) return std::vector<Piece>{};
    std::map<std::vector<int64_t>, std::shared_ptr<const attention::AttentionPlan>> shapes;
    std::vector<Piece> pieces;
    for (const attention::PlanPiece& p : split) {
      std::shared_ptr<const attention::AttentionPlan>& shared = shapes[p.shape.seq_lengths];
      if (shared == nullptr) {
        absl::StatusOr<attention::AttentionPlan> piece =
            attention::PlanAttention(plan.options, p.shape);
        if (!piece.ok()) return piece.status();
        if (absl::Status s = gpu_[0]->Supports(*piece); !s.ok()) return s;
        shared = std::make_shared<const attention::AttentionPlan>(*std::move(piece));
        *workspace_bytes = std::max(*workspace_bytes, gpu_[0]->WorkspaceBytes(*shared));
      }
      pieces.push_back({p.row_begin, p.row_end, shared});
    }
    return pieces;
  }

  // Rows of a job's tensors, which jobs in pieces and jobs over parts of their rows move between
  // the host and the device: through the fp32 buffer (dev[5]) when converting, its rows of a
  // tensor staging the same rows of the device tensor.
  struct JobRows {
    const Job& job;
    const std::vector<memory::Buffer>& dev;
    bool convert;
    int64_t row_values;   // per token row
    size_t row_bytes;     // of a device tensor's row (fp16 or bf16)
    size_t in_row_bytes;  // of a request tensor's row
    size_t bytes(int64_t row) const { return static_cast<size_t>(row) * row_bytes; }
    size_t in_bytes(int64_t row) const { return static_cast<size_t>(row) * in_row_bytes; }
    unsigned char* fp32() const { return static_cast<unsigned char*>(dev[5].data()); }
    // The conversion of rows from `row` on reports through the job's flag block.
    attention::cuda::ConversionFlags flags(int64_t row) const {
      return FlagBlock::OnDevice(job, dev[6].data(), row * row_values);
    }
  };
  JobRows RowsOf(const Job& job, const attention::AttentionPlan& plan,
                 const std::vector<memory::Buffer>& dev, bool convert) const {
    const int64_t row_values = int64_t{plan.params.num_heads} * plan.params.head_dim;
    return {job,
            dev,
            convert,
            row_values,
            plan.tensor_bytes / static_cast<size_t>(plan.params.total_tokens),
            static_cast<size_t>(row_values) * attention::DTypeSize(job.shape.dtype)};
  }
  // Rows [a, b) of input t to its device tensor, on copy_in_.
  absl::Status CopyRowsIn(const JobRows& r, int t, int64_t a, int64_t b) {
    auto* half = static_cast<unsigned char*>(r.dev[t].data());
    absl::Status s =
        CopyIn(r.job, t, r.convert ? r.fp32() : half, r.in_bytes(a), r.in_bytes(b), copy_in_);
    if (s.ok() && r.convert && b > a) {
      void* out = half + r.bytes(a);
      s = Cuda(static_cast<cudaError_t>(attention::cuda::LaunchFloatToHalf(
                   reinterpret_cast<const float*>(r.fp32() + r.in_bytes(a)), &out, 1,
                   (b - a) * r.row_values, Packed(r.row_values), r.flags(a), copy_in_)),
               "fp32 to fp16");
    }
    return s;
  }
  // Rows [a, b) of O back to the requests, on copy_out_.
  absl::Status CopyRowsOut(const JobRows& r, int64_t a, int64_t b) {
    const auto* o = static_cast<const unsigned char*>(r.dev[3].data());
    if (!r.convert) return CopyOut(r.job, o, r.bytes(a), r.bytes(b), copy_out_);
    absl::Status s = absl::OkStatus();
    if (b > a) {
      s = Cuda(static_cast<cudaError_t>(attention::cuda::LaunchHalfToFloat(
                   o + r.bytes(a), reinterpret_cast<float*>(r.fp32() + r.in_bytes(a)),
                   (b - a) * r.row_values, Packed(r.row_values), r.flags(a), copy_out_)),
               "fp16 to fp32");
    }
    return s.ok() ? CopyOut(r.job, r.fp32(), r.in_bytes(a), r.in_bytes(b), copy_out_) : s;
  }

  // A job in `parts` launches: part i's inputs (inputs(i), copies on copy_in_); its launch
  // (launch(i)) on the job's stream once they are in, the launch before it ahead of it; its output
  // rows (out_rows(i)) copied out on copy_out_ once it is done. Copies in both directions and the
  // launches overlap, and `done` (on copy_out_) follows everything. Part i's inputs are issued
  // after part i - 1's launch: an input copy can hold the host (copies from memory the driver
  // could not pin are synchronous, and a long queue of copies fills the driver's command buffer),
  // and the launch before it should be queued by then.
  template <class Inputs, class Launch, class OutRows>
  absl::Status IssueParts(const JobRows& r, size_t parts, cudaStream_t stream, GpuJob& state,
                          Inputs&& inputs, Launch&& launch, OutRows&& out_rows) {
    state.piece_events.reserve(2 * parts);
    for (size_t i = 0; i < 2 * parts; ++i) {
      cudaEvent_t e = nullptr;
      if (absl::Status s = Cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
          !s.ok()) {
        return s;
      }
      state.piece_events.push_back(e);
    }
    auto issue_inputs = [&](size_t i) {
      absl::Status s = inputs(i);
      if (s.ok()) s = Cuda(cudaEventRecord(state.piece_events[2 * i], copy_in_), "event");
      if (s.ok() && i == 0) s = Cuda(cudaEventRecord(state.copied, copy_in_), "event");
      return s;
    };
    state.host_work = MonotonicNow() - r.job.start;
    absl::Status s = Cuda(cudaEventRecord(state.begin, copy_in_), "event");
    if (s.ok() && r.convert) {
      s = Cuda(cudaMemcpyAsync(r.dev[6].data(), state.flags_host,
                               FlagBlock::Bytes(r.job.requests.size()), cudaMemcpyHostToDevice,
                               copy_in_),
               "copy to device");
    }
    if (s.ok()) s = issue_inputs(0);
    for (size_t i = 0; i < parts && s.ok(); ++i) {
      cudaEvent_t computed = state.piece_events[2 * i + 1];
      s = Cuda(cudaStreamWaitEvent(stream, state.piece_events[2 * i], 0), "wait");
      if (s.ok()) s = launch(i);
      if (s.ok()) s = Cuda(cudaEventRecord(computed, stream), "event");
      if (s.ok()) s = Cuda(cudaStreamWaitEvent(copy_out_, computed, 0), "wait");
      if (s.ok()) {
        const auto [a, b] = out_rows(i);
        s = CopyRowsOut(r, a, b);
      }
      if (s.ok() && i + 1 < parts) s = issue_inputs(i + 1);
    }
    if (s.ok()) s = Cuda(cudaEventRecord(state.computed, stream), "event");
    if (s.ok() && r.convert) {
      s = Cuda(cudaMemcpyAsync(state.flags_host, r.dev[6].data(),
                               FlagBlock::FlagBytes(r.job.requests.size()), cudaMemcpyDeviceToHost,
                               copy_out_),
               "copy to host");
    }
    if (s.ok()) s = Cuda(cudaEventRecord(state.done, copy_out_), "event");
    return s;
  }

  // A job in pieces (IssueParts): each piece's Q, K and V rows, then its own plan over them. An
  // fp32 job goes through the fp32 buffer piece by piece: a piece's rows of it stage Q, K and V in
  // turn (converted on copy_in_) and then its output (converted on copy_out_), while other pieces
  // use other rows.
  absl::Status IssuePieces(const Job& job, const std::vector<Piece>& pieces,
                           const std::vector<memory::Buffer>& dev, bool convert,
                           cudaStream_t stream, GpuJob& state) {
    if (!logged_pieces_) {
      LogInfo(
          "cuda executor: device %d: jobs of >= %d tokens run in pieces (the first: %d "
          "tokens in %d)",
          device_, options_.pipeline_min_tokens, pieces.back().row_end, pieces.size());
      logged_pieces_ = true;
    }
    const JobRows r = RowsOf(job, *pieces.front().plan, dev, convert);
    const DeviceLoc loc = DeviceLoc::Cuda(device_);
    const attention::TensorRef workspace{dev[4].data(), dev[4].size(), loc};
    return IssueParts(
        r, pieces.size(), stream, state,
        [&](size_t i) {
          const int64_t a = pieces[i].row_begin, b = pieces[i].row_end;
          WaitForInputBytes(job, r.in_bytes(b));  // rows still being copied out of their messages
          absl::Status s = absl::OkStatus();
          for (int t = 0; t < 3 && s.ok(); ++t) s = CopyRowsIn(r, t, a, b);
          return s;
        },
        [&](size_t i) {
          const Piece& piece = pieces[i];
          const size_t at = r.bytes(piece.row_begin), size = piece.plan->tensor_bytes;
          auto at_row = [&](int t) { return static_cast<unsigned char*>(dev[t].data()) + at; };
          const attention::AttentionTensors tensors{{at_row(0), size, loc},
                                                    {at_row(1), size, loc},
                                                    {at_row(2), size, loc},
                                                    {at_row(3), size, loc}};
          return gpu_[job.stream]->Run(*piece.plan, tensors, workspace);
        },
        [&](size_t i) {
          return std::pair{pieces[i].row_begin, pieces[i].row_end};
        });
  }

  // A long job that no cut splits into independent problems, over kRowParts equal parts of its
  // rows (IssueParts): K and V copied whole first (any part may read any of them), then part i's Q
  // rows up to q_ends[i] (those its tiles read that no earlier part's copy brought); part i's
  // output rows [cuts[i], cuts[i + 1]) are final once it is done. An fp32 job converts through
  // the fp32 buffer: K and V whole in turn, then Q and O by rows, where the Q rows staged for a
  // later part (at or past q_ends[i] >= cuts[i + 1]) are never rows of an output still
  // converting.
  absl::Status IssueRowParts(const Job& job, const attention::AttentionPlan& plan,
                             const std::vector<memory::Buffer>& dev, bool convert,
                             cudaStream_t stream, GpuJob& state) {
    const int64_t total = plan.params.total_tokens;
    std::vector<int64_t> cuts;
    for (int64_t c = 0; c <= kRowParts; ++c) cuts.push_back(total * c / kRowParts);
    absl::StatusOr<std::vector<int64_t>> q_ends_or = gpu_[job.stream]->PrepareParts(plan, cuts);
    if (!q_ends_or.ok()) return q_ends_or.status();
    const std::vector<int64_t>& q_ends = *q_ends_or;
    if (!logged_row_parts_) {
      LogInfo(
          "cuda executor: device %d: jobs of >= %d tokens that no cut splits run in %d launches "
          "over parts of their rows (the first: %d tokens)",
          device_, options_.pipeline_min_tokens, kRowParts, total);
      logged_row_parts_ = true;
    }
    const JobRows r = RowsOf(job, plan, dev, convert);
    const DeviceLoc loc = DeviceLoc::Cuda(device_);
    const attention::AttentionTensors tensors{{dev[0].data(), plan.tensor_bytes, loc},
                                              {dev[1].data(), plan.tensor_bytes, loc},
                                              {dev[2].data(), plan.tensor_bytes, loc},
                                              {dev[3].data(), plan.tensor_bytes, loc}};
    const attention::TensorRef workspace{dev[4].data(), dev[4].size(), loc};
    return IssueParts(
        r, cuts.size() - 1, stream, state,
        [&](size_t i) {
          absl::Status s = absl::OkStatus();
          if (i == 0) {
            WaitForInputBytes(job, r.in_bytes(total));  // still being copied out of messages
            for (int t = 1; t < 3 && s.ok(); ++t) s = CopyRowsIn(r, t, 0, total);
          }
          return s.ok() ? CopyRowsIn(r, 0, i > 0 ? q_ends[i - 1] : 0, q_ends[i]) : s;
        },
        [&](size_t i) { return gpu_[job.stream]->RunPart(plan, tensors, workspace, i); },
        [&](size_t i) {
          return std::pair{cuts[i], cuts[i + 1]};
        });
  }

  // Whatever happened, the buffers stay leased until the streams are past them.
  static void FinishStart(Job& job, std::unique_ptr<GpuJob> state, memory::Buffer flag,
                          std::vector<memory::Buffer>& dev) {
    job.leases.push_back(std::move(flag));
    for (memory::Buffer& b : dev) job.leases.push_back(std::move(b));
    job.device_state = std::shared_ptr<GpuJob>(std::move(state));
  }

  const int device_;
  const ExecutorOptions options_;
  const SharedHostPools shared_;
  cudaStream_t streams_[2] = {nullptr, nullptr};
  // Copies of jobs in pieces, shared by both streams' jobs (one copy engine each way anyway).
  cudaStream_t copy_in_ = nullptr, copy_out_ = nullptr;
  // Both streams' backends plan through one cache: WorkspaceBytes asks gpu_[0] for the list that
  // gpu_[job.stream] runs.
  std::shared_ptr<attention::GpuTileCache> tile_cache_ =
      std::make_shared<attention::GpuTileCache>();
  std::unique_ptr<attention::AttentionBackend> gpu_[2];
  std::unique_ptr<block_sparse::BlockSparseBackend> sparse_gpu_[2];
  std::unique_ptr<multihead::MultiheadBackend> multihead_gpu_[2];
  std::unique_ptr<Executor> cpu_;
  std::unique_ptr<memory::BufferPool> device_pool_;
  std::shared_ptr<memory::BufferPool> pinned_pool_;
  int next_stream_ = 0;
  bool logged_pieces_ = false;
  bool logged_row_parts_ = false;
  bool logged_padding_ = false;
  // DILATTN_TEST_TRAP_DEVICE or DILATTN_TEST_HANG_DEVICE names this device: its next GPU job
  // starts with that fault.
  enum class Fault { kNone, kTrap, kHang };
  Fault fault_ = Fault::kNone;
};

}  // namespace

absl::StatusOr<std::shared_ptr<memory::BufferPool>> CreatePinnedPool(
    const ExecutorOptions& options) {
  absl::StatusOr<std::unique_ptr<memory::Allocator>> pinned = memory::NewPinnedHostAllocator();
  if (!pinned.ok()) return pinned.status();
  absl::StatusOr<std::unique_ptr<memory::BufferPool>> pool =
      memory::BufferPool::Create({"pinned", options.host_pool_bytes}, *std::move(pinned));
  if (!pool.ok()) return pool.status();
  return std::shared_ptr<memory::BufferPool>(*std::move(pool));
}

absl::StatusOr<std::unique_ptr<Executor>> CreateCudaExecutor(const ExecutorOptions& options,
                                                             int device, SharedHostPools shared) {
  if (memory::CudaDeviceCount() <= device) {
    return absl::FailedPreconditionError(absl::StrCat("no CUDA device ", device));
  }
  auto e = std::make_unique<CudaExecutor>(device, options, std::move(shared));
  if (absl::Status s = e->Init(); !s.ok()) return s;
  return std::unique_ptr<Executor>(std::move(e));
}

}  // namespace dilattn::server
