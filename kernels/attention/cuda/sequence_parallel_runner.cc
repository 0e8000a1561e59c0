#include "kernels/attention/cuda/sequence_parallel_runner.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "kernels/attention/cuda/backend_util.h"
#include "kernels/attention/cuda/launch.h"
#include "kernels/attention/cuda/staged_upload.h"
#include "kernels/attention/sequence_parallel.h"
#include "kernels/memory/allocator.h"
#include "kernels/memory/buffer_pool.h"

namespace dilattn::attention::cuda {
namespace {

absl::Status Nccl(ncclResult_t r, absl::string_view what) {
  if (r == ncclSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", ncclGetErrorString(r)));
}

// A device buffer leased from its GPU's pool for one run.
struct Lease {
  memory::Buffer buffer;
  absl::Status Acquire(memory::BufferPool& pool, size_t bytes) {
    absl::StatusOr<memory::Buffer> b = pool.Acquire(std::max<size_t>(bytes, 16));
    if (!b.ok()) return b.status();
    buffer = *std::move(b);
    return absl::OkStatus();
  }
  void* ptr() const { return buffer.data(); }
  unsigned char* bytes() const { return static_cast<unsigned char*>(buffer.data()); }
};

class Runner final : public SequenceParallelRunner {
 public:
  Runner(std::vector<int> devices, size_t pool_bytes)
      : devices_(std::move(devices)), pool_bytes_(pool_bytes) {}
  ~Runner() override {
    for (size_t g = 0; g < devices_.size(); ++g) {
      cudaSetDevice(devices_[g]);
      if (g < streams_.size() && streams_[g] != nullptr) cudaStreamDestroy(streams_[g]);
      for (const std::vector<cudaStream_t>* st : {&copy_streams_, &in_streams_}) {
        if (g < st->size() && (*st)[g] != nullptr) cudaStreamDestroy((*st)[g]);
      }
      for (const auto* events : {&part_done_, &part_in_}) {
        if (g >= events->size()) continue;
        for (cudaEvent_t e : (*events)[g]) {
          if (e != nullptr) cudaEventDestroy(e);
        }
      }
      if (g < comms_.size() && comms_[g] != nullptr) ncclCommDestroy(comms_[g]);
    }
  }

  absl::Status Init() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    for (int d : devices_) {
      if (d < 0 || d >= count || std::count(devices_.begin(), devices_.end(), d) != 1) {
        return absl::FailedPreconditionError(
            absl::StrCat("CUDA device ", d, " is missing or repeated (", count, " found)"));
      }
    }
    streams_.assign(devices_.size(), nullptr);
    copy_streams_.assign(devices_.size(), nullptr);
    in_streams_.assign(devices_.size(), nullptr);
    part_done_.assign(devices_.size(), {});
    part_in_.assign(devices_.size(), {});
    majors_.assign(devices_.size(), 0);
    for (size_t g = 0; g < devices_.size(); ++g) {
      if (absl::Status s = CudaErrorStatus(cudaSetDevice(devices_[g]), "cudaSetDevice"); !s.ok()) {
        return s;
      }
      for (cudaStream_t* st : {&streams_[g], &copy_streams_[g], &in_streams_[g]}) {
        if (absl::Status s =
                CudaErrorStatus(cudaStreamCreateWithFlags(st, cudaStreamNonBlocking), "stream");
            !s.ok()) {
          return s;
        }
      }
      for (auto* events : {&part_done_[g], &part_in_[g]}) {
        for (cudaEvent_t& e : *events) {
          if (absl::Status s =
                  CudaErrorStatus(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
              !s.ok()) {
            return s;
          }
        }
      }
      cudaDeviceGetAttribute(&majors_[g], cudaDevAttrComputeCapabilityMajor, devices_[g]);
      // Buffers are leased per run and cached between runs (long sequences take gigabytes;
      // cudaMalloc and cudaFree of them would be part of every run).
      size_t free_bytes = 0, total_bytes = 0;
      if (absl::Status s = CudaErrorStatus(cudaMemGetInfo(&free_bytes, &total_bytes),
                                           "cudaMemGetInfo");
          !s.ok()) {
        return s;
      }
      absl::StatusOr<std::unique_ptr<memory::Allocator>> alloc =
          memory::NewCudaDeviceAllocator(devices_[g]);
      if (!alloc.ok()) return alloc.status();
      absl::StatusOr<std::unique_ptr<memory::BufferPool>> pool =
          memory::BufferPool::Create({absl::StrCat("sequence-parallel cuda:", devices_[g]),
                                      memory::DevicePoolCap(pool_bytes_, free_bytes)},
                                     *std::move(alloc));
      if (!pool.ok()) return pool.status();
      pools_.push_back(*std::move(pool));
    }
    if (devices_.size() > 1) {
      comms_.assign(devices_.size(), nullptr);
      return Nccl(ncclCommInitAll(comms_.data(), static_cast<int>(devices_.size()),
                                  devices_.data()),
                  "ncclCommInitAll");
    }
    return absl::OkStatus();
  }

  int num_devices() const override { return static_cast<int>(devices_.size()); }

  void ReleaseCachedMemory() override {
    for (const auto& pool : pools_) pool->Trim();
  }

  std::vector<size_t> LastRunDeviceBytes() const override { return last_run_bytes_; }

  std::vector<size_t> PoolCaps() const override {
    std::vector<size_t> caps;
    for (const auto& pool : pools_) caps.push_back(pool->byte_cap());
    return caps;
  }

  // pools_ is filled once, in Init, before the runner is handed out.
  std::vector<const memory::BufferPool*> pools() const override {
    std::vector<const memory::BufferPool*> out;
    for (const auto& pool : pools_) out.push_back(pool.get());
    return out;
  }

  using SequenceParallelRunner::Run;
  absl::Status Run(const AttentionPlan& plan, const AttentionTensors& host,
                   int64_t host_head_dim) override {
    // The caller's current device is theirs: restored on every way out.
    int caller_device = 0;
    cudaGetDevice(&caller_device);
    const absl::Status s = RunOnDevices(plan, host, host_head_dim);
    cudaSetDevice(caller_device);
    return s;
  }

 private:
  // Leases `bytes` on GPU g for this run and counts them.
  absl::Status Acquire(int g, memory::BufferPool& pool, Lease& lease, size_t bytes) {
    if (absl::Status s = lease.Acquire(pool, bytes); !s.ok()) return s;
    last_run_bytes_[static_cast<size_t>(g)] += lease.buffer.size();
    return absl::OkStatus();
  }

  absl::Status RunOnDevices(const AttentionPlan& plan, const AttentionTensors& host,
                            int64_t host_dim) {
    const DilatedAttentionParams& p = plan.params;
    if (!FusedForwardSupportsHeadDim(p.head_dim)) {
      return absl::InvalidArgumentError(
          absl::StrCat("head_dim D=", p.head_dim, " is not supported by the cuda kernels"));
    }
    if (absl::Status s = CheckCudaProblem(p); !s.ok()) return s;
    if (host_dim < 1 || host_dim > p.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat("host tensors of head dim ", host_dim,
                                                     " for a plan of head dim ", p.head_dim));
    }
    const size_t host_bytes =
        plan.tensor_bytes / static_cast<size_t>(p.head_dim) * static_cast<size_t>(host_dim);
    for (size_t bytes : {host.q.bytes, host.k.bytes, host.v.bytes, host.o.bytes}) {
      if (bytes != host_bytes) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensors of ", bytes, " bytes; the plan's are ", host_bytes));
      }
    }
    absl::StatusOr<const HostPlan*> planned = PlanFor(plan);
    if (!planned.ok()) return planned.status();
    const HostPlan& hp = **planned;
    const SequenceParallelPlan* sp = &hp.sp;
    const std::vector<int32_t>& all_rows = hp.all_rows;
    const std::vector<int64_t>& rows_at = hp.rows_at;
    const int64_t n = plan.seq_offsets[1];
    const size_t row_bytes = static_cast<size_t>(p.num_heads) * p.head_dim * 2;
    const bool exchange = !sp->spanning_branches.empty();
    const size_t pack_bytes = static_cast<size_t>(sp->max_send_rows) * p.head_dim * 2;
    const int ranks = num_devices();

    struct PerGpu {
      Lease k, v, q, o, tables, send, recv, rows, dest;
      int64_t begin = 0, end = 0, key_rows_end = 0;
      // Every buffer shifted back by begin: the kernel and the row moves address them by row
      // position, and read only [begin, end) (Q, O) or [begin, key_rows_end) (K, V).
      size_t shift = 0;
      unsigned char* at_0(const Lease& l) const { return l.bytes() - shift; }
    };
    last_run_bytes_.assign(static_cast<size_t>(ranks), 0);
    std::vector<PerGpu> gpu(static_cast<size_t>(ranks));
    // A padded plan: each (token, head) row is host_dim values on the host and head_dim on the
    // devices, whose extra columns are zeros in Q and K (they add nothing to a score) and in V.
    const bool padded = host_dim != p.head_dim;
    const size_t host_row = static_cast<size_t>(host_dim) * 2;
    const size_t dev_row = static_cast<size_t>(p.head_dim) * 2;
    const size_t host_row_bytes = static_cast<size_t>(p.num_heads) * host_row;
    // Rows [begin, end) of the chosen inputs (Q, K, V) from the host to GPU m's buffers, on `st`.
    enum Inputs { kQ = 1, kKV = 2, kQKV = 3 };
    auto copy_inputs = [&](const PerGpu& m, int64_t begin, int64_t end, cudaStream_t st,
                           int which = kQKV) -> absl::Status {
      const size_t at = static_cast<size_t>(begin) * row_bytes;
      const size_t bytes = static_cast<size_t>(end - begin) * row_bytes;
      const size_t host_at = static_cast<size_t>(begin) * host_row_bytes;
      const size_t head_rows = static_cast<size_t>(end - begin) * static_cast<size_t>(p.num_heads);
      for (auto [dst, src, kind] :
           {std::tuple{&m.q, host.q.data, kQ}, std::tuple{&m.k, host.k.data, kKV},
            std::tuple{&m.v, host.v.data, kKV}}) {
        if ((which & kind) == 0 || bytes == 0) continue;
        unsigned char* to = m.at_0(*dst) + at;
        const auto* from = static_cast<const unsigned char*>(src) + host_at;
        cudaError_t err;
        if (padded) {
          err = cudaMemset2DAsync(to + host_row, dev_row, 0, dev_row - host_row, head_rows, st);
          if (err == cudaSuccess) {
            err = cudaMemcpy2DAsync(to, dev_row, from, host_row, host_row, head_rows,
                                    cudaMemcpyDefault, st);
          }
        } else {
          err = cudaMemcpyAsync(to, from, bytes, cudaMemcpyDefault, st);
        }
        if (absl::Status s = CudaErrorStatus(err, "copy to device"); !s.ok()) return s;
      }
      return absl::OkStatus();
    };
    // Part c's inputs on GPU g's input stream, then the event its launch waits for: its rows of
    // Q, K and V when the parts are cut by segments, otherwise (K and V already whole) the Q rows
    // its tiles read that no earlier part's copy brought.
    auto copy_part_inputs = [&](int g, size_t c) -> absl::Status {
      const std::vector<SlicePart>& parts = hp.parts[static_cast<size_t>(g)];
      const SlicePart& part = parts[c];
      cudaStream_t st = in_streams_[static_cast<size_t>(g)];
      const PerGpu& m = gpu[static_cast<size_t>(g)];
      if (absl::Status s =
              hp.inputs_by_part[static_cast<size_t>(g)]
                  ? copy_inputs(m, part.row_begin, part.row_end, st)
                  : copy_inputs(m, c == 0 ? m.begin : parts[c - 1].q_end, part.q_end, st, kQ);
          !s.ok()) {
        return s;
      }
      return CudaErrorStatus(cudaEventRecord(part_in_[static_cast<size_t>(g)][c], st), "event");
    };
    // Declared after the leases, so it runs first on every way out: the streams are done with
    // the leases before they go back to the pools, and O is in host memory on success.
    struct Drain {
      Runner& r;
      ~Drain() {
        for (size_t g = 0; g < r.devices_.size(); ++g) {
          cudaSetDevice(r.devices_[g]);
          cudaStreamSynchronize(r.in_streams_[g]);
          cudaStreamSynchronize(r.streams_[g]);
          cudaStreamSynchronize(r.copy_streams_[g]);
        }
      }
    } drain{*this};
    for (int g = 0; g < ranks; ++g) {
      PerGpu& m = gpu[static_cast<size_t>(g)];
      const bool owns = g < static_cast<int>(sp->slices.size());
      if (owns) {
        const SequenceSlicePlan& slice = sp->slices[static_cast<size_t>(g)];
        m.begin = slice.begin;
        m.end = slice.end;
        m.key_rows_end = slice.key_rows_end;
      }
      m.shift = static_cast<size_t>(m.begin) * row_bytes;
      const int dev = devices_[static_cast<size_t>(g)];
      memory::BufferPool& pool = *pools_[static_cast<size_t>(g)];
      cudaStream_t stream = streams_[static_cast<size_t>(g)];
      if (absl::Status s = CudaErrorStatus(cudaSetDevice(dev), "cudaSetDevice"); !s.ok()) return s;
      const size_t slice_bytes = static_cast<size_t>(m.end - m.begin) * row_bytes;
      const size_t key_bytes = static_cast<size_t>(m.key_rows_end - m.begin) * row_bytes;
      // Q and O over the slice; K and V over the slice and the packed keys of spanning branches
      // (filled by the exchange).
      for (auto [mem, bytes] : {std::pair{&m.k, key_bytes}, std::pair{&m.v, key_bytes},
                                std::pair{&m.q, slice_bytes}, std::pair{&m.o, slice_bytes}}) {
        if (absl::Status s = Acquire(g, pool, *mem, bytes); !s.ok()) return s;
      }
      // By part: part 0's inputs now, each later part's after the launch before it (below).
      // Parts not cut by segments read K and V anywhere in the slice (and the exchange packs
      // them): those go whole now, and Q by part.
      const bool by_part = owns && hp.inputs_by_part[static_cast<size_t>(g)];
      const bool q_by_part = owns && !by_part && hp.parts[static_cast<size_t>(g)].size() > 1;
      if (absl::Status s = by_part     ? copy_part_inputs(g, 0)
                           : q_by_part ? copy_inputs(m, m.begin, m.end, stream, kKV)
                                       : copy_inputs(m, m.begin, m.end, stream);
          !s.ok()) {
        return s;
      }
      if (q_by_part) {
        if (absl::Status s = copy_part_inputs(g, 0); !s.ok()) return s;
      }
      if (exchange) {
        const std::vector<int32_t>& dest = hp.dest[static_cast<size_t>(g)];
        for (auto [mem, bytes] :
             {std::pair{&m.send, 2 * pack_bytes}, std::pair{&m.recv, 2 * pack_bytes * ranks},
              std::pair{&m.rows, all_rows.size() * sizeof(int32_t)},
              std::pair{&m.dest, dest.size() * sizeof(int32_t)}}) {
          if (absl::Status s = Acquire(g, pool, *mem, bytes); !s.ok()) return s;
        }
        for (auto [to, from] : {std::pair{&m.rows, &all_rows}, std::pair{&m.dest, &dest}}) {
          if (from->empty()) continue;
          if (absl::Status s = CudaErrorStatus(
                  cudaMemcpyAsync(to->ptr(), from->data(), from->size() * sizeof(int32_t),
                                  cudaMemcpyHostToDevice, stream),
                  "copy to device");
              !s.ok()) {
            return s;
          }
        }
        const int32_t* mine = static_cast<const int32_t*>(m.rows.ptr()) + 2 * rows_at[g];
        const int64_t count = rows_at[g + 1] - rows_at[g];
        for (int t = 0; t < 2; ++t) {
          if (absl::Status s = CudaErrorStatus(
                  LaunchMoveHeadRows(true, m.at_0(t == 0 ? m.k : m.v), p.k_row_stride, p.head_dim,
                                     mine, count, m.send.bytes() + t * pack_bytes, stream),
                  "pack rows");
              !s.ok()) {
            return s;
          }
        }
      }
    }
    if (exchange) {
      if (absl::Status s = Nccl(ncclGroupStart(), "ncclGroupStart"); !s.ok()) return s;
      for (int g = 0; g < ranks; ++g) {
        PerGpu& m = gpu[static_cast<size_t>(g)];
        if (absl::Status s = Nccl(ncclAllGather(m.send.ptr(), m.recv.ptr(), 2 * pack_bytes,
                                                ncclUint8,
                                                comms_[static_cast<size_t>(g)],
                                                streams_[static_cast<size_t>(g)]),
                                  "ncclAllGather");
            !s.ok()) {
          ncclGroupEnd();
          return s;
        }
      }
      if (absl::Status s = Nccl(ncclGroupEnd(), "ncclGroupEnd"); !s.ok()) return s;
    }
    std::vector<FusedForwardParams> launch(static_cast<size_t>(ranks));
    for (int g = 0; g < ranks && g < static_cast<int>(sp->slices.size()); ++g) {
      PerGpu& m = gpu[static_cast<size_t>(g)];
      const SequenceSlicePlan& slice = sp->slices[static_cast<size_t>(g)];
      cudaStream_t stream = streams_[static_cast<size_t>(g)];
      if (absl::Status s = CudaErrorStatus(cudaSetDevice(devices_[static_cast<size_t>(g)]),
                                           "cudaSetDevice");
          !s.ok()) {
        return s;
      }
      // Every slice's rows, this one's included, into the packed keys of K and V.
      for (int o = 0; exchange && o < ranks; ++o) {
        const int32_t* to = static_cast<const int32_t*>(m.dest.ptr()) + 2 * rows_at[o];
        const int64_t count = rows_at[o + 1] - rows_at[o];
        for (int t = 0; t < 2; ++t) {
          if (absl::Status s = CudaErrorStatus(
                  LaunchMoveHeadRows(false, m.at_0(t == 0 ? m.k : m.v), p.k_row_stride, p.head_dim,
                                     to, count, m.recv.bytes() + (2 * o + t) * pack_bytes, stream),
                  "unpack rows");
              !s.ok()) {
            return s;
          }
        }
      }
      const std::vector<unsigned char>& tables = hp.tables[static_cast<size_t>(g)];
      if (absl::Status s = Acquire(g, *pools_[static_cast<size_t>(g)], m.tables, tables.size());
          !s.ok()) {
        return s;
      }
      if (absl::Status s =
              CudaErrorStatus(cudaMemcpyAsync(m.tables.ptr(), tables.data(), tables.size(),
                                              cudaMemcpyHostToDevice, stream),
                              "copy to device");
          !s.ok()) {
        return s;
      }
      // The kernel addresses every tensor by row position: the buffers shifted back by begin.
      const DeviceLoc dev = DeviceLoc::Cuda(devices_[static_cast<size_t>(g)]);
      const AttentionTensors t{{m.at_0(m.q), n * row_bytes, dev},
                               {m.at_0(m.k), n * row_bytes, dev},
                               {m.at_0(m.v), n * row_bytes, dev},
                               {m.at_0(m.o), n * row_bytes, dev}};
      FusedForwardParams& params = launch[static_cast<size_t>(g)];
      params = BindFusedParams(p, t, m.tables.ptr());
      std::copy(slice.packed.begin(), slice.packed.end(), params.packed);
      params.variant = SelectFusedVariant(majors_[static_cast<size_t>(g)], p.head_dim);
    }
    // Part by part, the GPUs in turn: each part's O rows go back on the copy stream while the
    // next part runs; by part, the next part's inputs are issued after this part's launch.
    for (size_t c = 0; c < static_cast<size_t>(kParts); ++c) {
      for (int g = 0; g < ranks && g < static_cast<int>(sp->slices.size()); ++g) {
        const std::vector<SlicePart>& parts = hp.parts[static_cast<size_t>(g)];
        if (c >= parts.size()) continue;
        const SlicePart& part = parts[c];
        const PerGpu& m = gpu[static_cast<size_t>(g)];
        cudaStream_t stream = streams_[static_cast<size_t>(g)];
        // With several parts, each part's inputs come on the input stream (Q alone when they are
        // not cut by segments).
        const bool waits_for_inputs = parts.size() > 1;
        FusedForwardParams& params = launch[static_cast<size_t>(g)];
        if (absl::Status s =
                CudaErrorStatus(cudaSetDevice(devices_[static_cast<size_t>(g)]), "cudaSetDevice");
            !s.ok()) {
          return s;
        }
        if (waits_for_inputs) {
          if (absl::Status s = CudaErrorStatus(
                  cudaStreamWaitEvent(stream, part_in_[static_cast<size_t>(g)][c], 0), "event");
              !s.ok()) {
            return s;
          }
        }
        params.tiles =
            reinterpret_cast<const GpuTile*>(m.tables.bytes() + kTilesAt) + part.tile_begin;
        params.num_tiles = part.num_tiles;
        params.keyless = KeylessPlacement{part.keyless, 1};
        if (absl::Status s = CudaErrorStatus(LaunchFusedForward(params, stream), "fused forward");
            !s.ok()) {
          return s;
        }
        cudaStream_t copy = stream;
        if (parts.size() > 1) {
          copy = copy_streams_[static_cast<size_t>(g)];
          cudaEvent_t done = part_done_[static_cast<size_t>(g)][c];
          if (absl::Status s = CudaErrorStatus(cudaEventRecord(done, stream), "event"); !s.ok()) {
            return s;
          }
          if (absl::Status s = CudaErrorStatus(cudaStreamWaitEvent(copy, done, 0), "event");
              !s.ok()) {
            return s;
          }
        }
        const size_t at = static_cast<size_t>(part.row_begin) * row_bytes;
        const size_t rows = static_cast<size_t>(part.row_end - part.row_begin);
        auto* to = static_cast<unsigned char*>(host.o.data) +
                   static_cast<size_t>(part.row_begin) * host_row_bytes;
        const cudaError_t err =
            padded
                ? cudaMemcpy2DAsync(to, host_row, m.at_0(m.o) + at, dev_row, host_row,
                                    rows * static_cast<size_t>(p.num_heads), cudaMemcpyDefault,
                                    copy)
                : cudaMemcpyAsync(to, m.at_0(m.o) + at, rows * row_bytes, cudaMemcpyDefault, copy);
        if (absl::Status s = CudaErrorStatus(err, "copy to host"); !s.ok()) return s;
        if (c + 1 < parts.size()) {
          if (absl::Status s = copy_part_inputs(g, c + 1); !s.ok()) return s;
        }
      }
    }
    // The status of the work queued above (Drain waits again on the way out: a no-op by then).
    absl::Status status = absl::OkStatus();
    for (int g = 0; g < ranks; ++g) {
      cudaSetDevice(devices_[static_cast<size_t>(g)]);
      for (cudaStream_t st : {in_streams_[static_cast<size_t>(g)], streams_[static_cast<size_t>(g)],
                              copy_streams_[static_cast<size_t>(g)]}) {
        absl::Status s = CudaErrorStatus(cudaStreamSynchronize(st), "sequence-parallel run");
        if (status.ok()) status = s;
      }
    }
    return status;
  }

  // A slice's rows run in up to kParts launches (SliceParts), so that the output of one part goes
  // back to the host while the next part runs. Tiles go to the part of their first row: every
  // tile that writes a part's rows then runs in that part's launch or an earlier one. Parts cut
  // by segments read only their own inputs, which are then copied part by part too; otherwise K
  // and V are copied whole first and Q part by part, up to the last row each part's tiles read.
  static constexpr int kParts = 4;
  static constexpr int64_t kMinPartRows = 65536;  // shorter slices run in one launch
  struct SlicePart {
    int64_t row_begin, row_end;  // the part's rows (positions)
    int64_t tile_begin;          // its tiles in the rank's table: the keyless ones first
    int64_t num_tiles;
    int64_t keyless;
    int64_t q_end;  // Q rows up to here are on the GPU once this part's inputs are
  };

  // What the host plans for one shape, kept for the next run of the same shape (a server's steady
  // traffic; planning a 2M-token split takes 15-28 ms).
  struct HostPlan {
    std::string fingerprint;  // PlanFingerprint of the plan it was made for
    SequenceParallelPlan sp;
    // Every rank's send list, in rank order: each rank needs all of them to place what it
    // receives; rank g's (position, head) pairs start at pair rows_at[g].
    std::vector<int32_t> all_rows;
    std::vector<int64_t> rows_at;
    std::vector<std::vector<int32_t>> dest;  // per rank: where all_rows land there
    // Per rank: its sequence offsets {0, n}, then its tiles from kTilesAt, part by part, as
    // uploaded; and its parts.
    std::vector<std::vector<unsigned char>> tables;
    std::vector<std::vector<SlicePart>> parts;
    std::vector<bool> inputs_by_part;  // per rank: its parts read only their own inputs
  };
  static constexpr size_t kTilesAt = 256;

  absl::StatusOr<const HostPlan*> PlanFor(const AttentionPlan& plan) {
    std::string fingerprint = PlanFingerprint(plan);
    if (host_plan_ != nullptr && host_plan_->fingerprint == fingerprint) return host_plan_.get();
    host_plan_.reset();
    absl::StatusOr<SequenceParallelPlan> sp =
        PlanSequenceParallel(plan, num_devices(), FusedBlockM(plan.params.head_dim));
    if (!sp.ok()) return sp.status();
    auto hp = std::make_unique<HostPlan>();
    hp->fingerprint = std::move(fingerprint);
    hp->sp = *std::move(sp);
    const size_t ranks = devices_.size();
    const std::vector<SequenceSlicePlan>& slices = hp->sp.slices;
    hp->rows_at.assign(ranks + 1, 0);
    for (size_t g = 0; g < ranks; ++g) {
      if (g < slices.size()) {
        hp->all_rows.insert(hp->all_rows.end(), slices[g].send_rows.begin(),
                            slices[g].send_rows.end());
      }
      hp->rows_at[g + 1] = static_cast<int64_t>(hp->all_rows.size() / 2);
    }
    hp->dest.resize(ranks);
    hp->tables.resize(ranks);
    hp->parts.resize(ranks);
    hp->inputs_by_part.assign(ranks, false);
    const int64_t offsets[2] = {0, plan.seq_offsets[1]};
    for (size_t g = 0; g < slices.size() && g < ranks; ++g) {
      if (!hp->sp.spanning_branches.empty()) {
        hp->dest[g].reserve(hp->all_rows.size());
        for (const std::vector<int32_t>& from : slices[g].receive_rows) {
          hp->dest[g].insert(hp->dest[g].end(), from.begin(), from.end());
        }
      }
      const SequenceSlicePlan& slice = slices[g];
      const int64_t rows = slice.end - slice.begin;
      const int num_parts = rows >= kParts * kMinPartRows ? kParts : 1;
      bool by_segments = false;
      std::vector<SlicePart>& parts = hp->parts[g];
      for (auto [b, e] : SliceParts(plan.params, !hp->sp.spanning_branches.empty(), slice.begin,
                                    slice.end, num_parts, &by_segments)) {
        parts.push_back({b, e, 0, 0, 0, 0});
      }
      hp->inputs_by_part[g] = by_segments;
      // The slice's tiles by part (CutTilesIntoParts: keyless ones first, a part's Q up to the
      // last row its tiles read); their positions are rows, the slice one sequence from 0.
      std::vector<int64_t> cuts;
      for (const SlicePart& part : parts) cuts.push_back(part.row_begin);
      cuts.push_back(parts.back().row_end);
      std::vector<GpuTile> parted;
      const std::vector<TilePart> cut =
          CutTilesIntoParts(slice.tiles, slice.keyless, {0, plan.seq_offsets[1]}, cuts, &parted);
      for (size_t c = 0; c < parts.size(); ++c) {
        parts[c].tile_begin = cut[c].tile_begin;
        parts[c].num_tiles = cut[c].num_tiles;
        parts[c].keyless = cut[c].keyless;
        parts[c].q_end = cut[c].q_end;
      }
      std::vector<unsigned char>& t = hp->tables[g];
      t.assign(kTilesAt + parted.size() * sizeof(GpuTile), 0);
      std::memcpy(t.data(), offsets, sizeof(offsets));
      if (!parted.empty()) {
        std::memcpy(t.data() + kTilesAt, parted.data(), parted.size() * sizeof(GpuTile));
      }
    }
    // The runs read the tables and lists above; the plan's own copies of them go.
    for (SequenceSlicePlan& slice : hp->sp.slices) {
      std::vector<GpuTile>().swap(slice.tiles);
      std::vector<int32_t>().swap(slice.send_rows);
      std::vector<std::vector<int32_t>>().swap(slice.receive_rows);
    }
    host_plan_ = std::move(hp);
    return host_plan_.get();
  }

  std::vector<int> devices_;
  const size_t pool_bytes_;  // each device pool's cap, as DevicePoolCap takes it
  std::vector<cudaStream_t> streams_;
  std::vector<cudaStream_t> copy_streams_;  // per device: O back to the host, part by part
  std::vector<cudaStream_t> in_streams_;    // per device: inputs part by part (no exchange)
  std::vector<std::array<cudaEvent_t, kParts>> part_done_;  // per device: each part's launch
  std::vector<std::array<cudaEvent_t, kParts>> part_in_;    // per device: each part's inputs
  std::vector<ncclComm_t> comms_;
  std::vector<int> majors_;
  std::vector<std::unique_ptr<memory::BufferPool>> pools_;  // one per device
  std::vector<size_t> last_run_bytes_;                      // leased per device, last run
  std::unique_ptr<HostPlan> host_plan_;                     // of the last shape run
};

}  // namespace

absl::StatusOr<std::unique_ptr<SequenceParallelRunner>> SequenceParallelRunner::Create(
    std::vector<int> devices, size_t pool_bytes) {
  if (devices.empty()) return absl::InvalidArgumentError("no devices");
  auto r = std::make_unique<Runner>(std::move(devices), pool_bytes);
  if (absl::Status s = r->Init(); !s.ok()) return s;
  return std::unique_ptr<SequenceParallelRunner>(std::move(r));
}

}  // namespace dilattn::attention::cuda
