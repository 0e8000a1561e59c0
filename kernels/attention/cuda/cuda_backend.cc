// The CUDA backend: plans the tile list on the host, uploads it with the sequence offsets into
// the caller's device workspace, and launches the fused kernel on its stream. Host compiler
// only: the kernels are reached through launch.h.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/cuda/backend_util.h"
#include "kernels/attention/cuda/launch.h"
#include "kernels/attention/cuda/staged_upload.h"
#include "kernels/attention/gpu_tiles.h"

namespace dilattn::attention {
namespace {

constexpr size_t kAlign = 256;
size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

absl::Status CudaStatus(cudaError_t err, absl::string_view what) {
  return cuda::CudaErrorStatus(err, what);
}

struct Layout {
  size_t offsets_bytes;
  size_t tiles_offset;
  size_t total;
};

Layout WorkspaceLayout(const AttentionPlan& plan, int64_t tiles) {
  Layout l;
  l.offsets_bytes = sizeof(int64_t) * plan.seq_offsets.size();
  l.tiles_offset = AlignUp(l.offsets_bytes);
  l.total = l.tiles_offset + sizeof(GpuTile) * static_cast<size_t>(tiles);
  return l;
}

class CudaBackend final : public AttentionBackend {
 public:
  CudaBackend(int device, cudaStream_t stream, int major, bool force_mma, std::string name,
              std::shared_ptr<GpuTileCache> cache)
      : device_(device),
        stream_(stream),
        major_(major),
        force_mma_(force_mma),
        name_(std::move(name)),
        cache_(std::move(cache)) {}

  absl::string_view name() const override { return name_; }
  DeviceLoc location() const override { return DeviceLoc::Cuda(device_); }

  // The one selector: Supports, WorkspaceBytes and Run all go through it.
  absl::Status Supports(const AttentionPlan& plan) const override {
    const DilatedAttentionParams& p = plan.params;
    if (!cuda::FusedForwardSupportsHeadDim(p.head_dim) && p.dtype != DType::kFloat32) {
      return absl::InvalidArgumentError(
          absl::StrCat("head_dim D=", p.head_dim,
                       " is not supported by the cuda backend (16, 32, 64, 128, 256)"));
    }
    return cuda::CheckCudaProblem(p);
  }

  // Plans the list through the cache, where Run finds it again.
  size_t WorkspaceBytes(const AttentionPlan& plan) const override {
    if (!Supports(plan).ok()) return 0;
    absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> list =
        cache_->Get(cuda::PlanFingerprint(plan), plan, cuda::FusedBlockM(plan.params.head_dim));
    // A plan the tiles cannot describe fails in Run, with the reason.
    return WorkspaceLayout(plan, list.ok() ? static_cast<int64_t>((*list)->tiles.size()) : 0).total;
  }

  absl::Status Run(const AttentionPlan& plan, const AttentionTensors& tensors,
                   TensorRef workspace) override {
    if (absl::Status s = Supports(plan); !s.ok()) return s;
    if (absl::Status s = CheckRun(plan, tensors); !s.ok()) return s;
    if (absl::Status s = PlanTiles(plan); !s.ok()) return s;
    absl::StatusOr<unsigned char*> device =
        StageAndUpload(plan, list_->tiles, Staged::kTiles, workspace);
    if (!device.ok()) return device.status();
    return Launch(plan, tensors, *device, 0, static_cast<int64_t>(list_->tiles.size()),
                  list_->keyless);
  }

  // The tile list regrouped by part (CutTilesIntoParts), kept while the shape and the cuts stay
  // the same.
  absl::StatusOr<std::vector<int64_t>> PrepareParts(const AttentionPlan& plan,
                                                    const std::vector<int64_t>& cuts) override {
    if (absl::Status s = Supports(plan); !s.ok()) return s;
    const int64_t total = plan.params.total_tokens;
    if (cuts.size() < 2 || cuts.front() != 0 || cuts.back() != total ||
        !std::is_sorted(cuts.begin(), cuts.end())) {
      return absl::InvalidArgumentError(
          absl::StrCat("part cuts must ascend from 0 to the plan's ", total, " rows"));
    }
    if (absl::Status s = PlanTiles(plan); !s.ok()) return s;
    if (parts_fingerprint_ != tiles_fingerprint_ || part_cuts_ != cuts) {
      parts_fingerprint_.clear();
      if (staged_ == Staged::kParts) staged_ = Staged::kNothing;
      parts_ =
          CutTilesIntoParts(list_->tiles, list_->keyless, plan.seq_offsets, cuts, &part_tiles_);
      part_cuts_ = cuts;
      parts_fingerprint_ = tiles_fingerprint_;
    }
    std::vector<int64_t> q_ends;
    for (const TilePart& part : parts_) q_ends.push_back(part.q_end);
    return q_ends;
  }

  absl::Status RunPart(const AttentionPlan& plan, const AttentionTensors& tensors,
                       TensorRef workspace, size_t part) override {
    if (absl::Status s = Supports(plan); !s.ok()) return s;
    if (parts_fingerprint_.empty() || parts_fingerprint_ != cuda::PlanFingerprint(plan) ||
        part >= parts_.size()) {
      return absl::FailedPreconditionError(
          absl::StrCat("part ", part, " of a plan whose parts were not prepared"));
    }
    if (absl::Status s = CheckRun(plan, tensors); !s.ok()) return s;
    // Part 0 uploads every part's tiles; the later parts' launches follow it on the stream.
    absl::StatusOr<unsigned char*> device =
        part == 0 ? StageAndUpload(plan, part_tiles_, Staged::kParts, workspace)
                  : WorkspaceFor(plan, part_tiles_.size(), workspace);
    if (!device.ok()) return device.status();
    const TilePart& range = parts_[part];
    return Launch(plan, tensors, *device, range.tile_begin, range.num_tiles,
                  KeylessPlacement{range.keyless, 1});
  }

 private:
  // What staging_ holds: nothing yet, list_ (of tiles_fingerprint_), or part_tiles_ (of
  // parts_fingerprint_).
  enum class Staged { kNothing, kTiles, kParts };

  // The tensors' checks and the device, before a launch.
  absl::Status CheckRun(const AttentionPlan& plan, const AttentionTensors& tensors) const {
    if (absl::Status s = CheckTensors(plan, tensors, location()); !s.ok()) return s;
    if (absl::Status s = cuda::CheckCudaTensorAlignment(tensors); !s.ok()) return s;
    return CudaStatus(cudaSetDevice(device_), "cudaSetDevice");
  }
  // The workspace, checked to hold the sequence offsets and a list of `tiles`.
  absl::StatusOr<unsigned char*> WorkspaceFor(const AttentionPlan& plan, size_t tiles,
                                              TensorRef workspace) const {
    const Layout layout = WorkspaceLayout(plan, static_cast<int64_t>(tiles));
    if (workspace.bytes < layout.total || !(workspace.location == location())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda workspace must hold ", layout.total, " bytes on ", location().ToString(), ", got ",
          workspace.bytes, " on ", workspace.location.ToString()));
    }
    return static_cast<unsigned char*>(workspace.data);
  }
  // The sequence offsets and `list` into the workspace, on the stream. Staging keeps the last
  // list: a repeated shape uploads it again without rewriting it.
  absl::StatusOr<unsigned char*> StageAndUpload(const AttentionPlan& plan,
                                                const std::vector<GpuTile>& list, Staged which,
                                                TensorRef workspace) {
    absl::StatusOr<unsigned char*> device = WorkspaceFor(plan, list.size(), workspace);
    if (!device.ok()) return device;
    const Layout layout = WorkspaceLayout(plan, static_cast<int64_t>(list.size()));
    if (staged_ != which) {
      absl::StatusOr<unsigned char*> host = staging_.Reserve(layout.total);
      if (!host.ok()) return host.status();
      std::memcpy(*host, plan.seq_offsets.data(), layout.offsets_bytes);
      std::memcpy(*host + layout.tiles_offset, list.data(), sizeof(GpuTile) * list.size());
      staged_ = which;
    }
    if (absl::Status s = staging_.Upload(*device, layout.total, stream_); !s.ok()) return s;
    return device;
  }
  // The fused kernel over `count` tiles of the uploaded list from `first`.
  absl::Status Launch(const AttentionPlan& plan, const AttentionTensors& tensors,
                      unsigned char* device, int64_t first, int64_t count,
                      const KeylessPlacement& keyless) {
    const Layout layout = WorkspaceLayout(plan, 0);
    cuda::FusedForwardParams params = cuda::BindFusedParams(plan.params, tensors, device);
    params.tiles = reinterpret_cast<const GpuTile*>(device + layout.tiles_offset) + first;
    params.num_tiles = count;
    params.keyless = keyless;
    params.variant = force_mma_ ? cuda::FusedVariant::kMmaSync
                                : cuda::SelectFusedVariant(major_, plan.params.head_dim);
    return CudaStatus(static_cast<cudaError_t>(cuda::LaunchFusedForward(params, stream_)),
                      "fused forward launch");
  }

  // The tile list depends only on the problem's shape and options: repeated shapes (benchmarks,
  // steady serving traffic) reuse a list instead of planning again on the host, and the last
  // one stays staged for the next upload.
  absl::Status PlanTiles(const AttentionPlan& plan) {
    std::string fingerprint = cuda::PlanFingerprint(plan);
    if (fingerprint == tiles_fingerprint_) return absl::OkStatus();
    tiles_fingerprint_.clear();
    parts_fingerprint_.clear();
    staged_ = Staged::kNothing;
    absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> list =
        cache_->Get(fingerprint, plan, cuda::FusedBlockM(plan.params.head_dim));
    if (!list.ok()) return list.status();
    list_ = *std::move(list);
    tiles_fingerprint_ = std::move(fingerprint);
    return absl::OkStatus();
  }

  int device_;
  cudaStream_t stream_;
  int major_;
  bool force_mma_;  // DILATTN_CUDA_KERNEL=mma: the mma.sync variant everywhere (comparisons)
  std::string name_;
  std::shared_ptr<GpuTileCache> cache_;
  std::shared_ptr<const GpuTileCache::List> list_;  // of tiles_fingerprint_
  std::string tiles_fingerprint_;
  cuda::StagedUpload staging_;
  Staged staged_ = Staged::kNothing;
  // PrepareParts: the tiles regrouped by part, for parts_fingerprint_ and part_cuts_.
  std::vector<GpuTile> part_tiles_;
  std::vector<TilePart> parts_;
  std::vector<int64_t> part_cuts_;
  std::string parts_fingerprint_;
};

}  // namespace

namespace cuda {

absl::Status CheckCudaProblem(const DilatedAttentionParams& p) {
  if (p.dtype == DType::kFloat32) {
    return absl::InvalidArgumentError(
        "the cuda backend computes on fp16 or bf16 tensors (the server converts fp32 "
        "requests to fp16)");
  }
  if (p.max_seq_len > kGpuMaxSeqLen || p.num_heads > kGpuMaxHeads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the cuda backend takes sequences of at most ", kGpuMaxSeqLen, " tokens and at most ",
        kGpuMaxHeads, " heads, got N=", p.max_seq_len, " and H=", p.num_heads));
  }
  // The kernels form key-row offsets as 32-bit products; contiguous tensors have H * D.
  constexpr int64_t kMaxRowStride = std::numeric_limits<int32_t>::max();
  if (p.k_row_stride > kMaxRowStride || p.v_row_stride > kMaxRowStride) {
    return absl::InvalidArgumentError(
        absl::StrCat("the cuda backend takes K and V row strides of at most ", kMaxRowStride,
                     " elements, got ", p.k_row_stride, " and ", p.v_row_stride));
  }
  // Q, K and V rows are read in 16-byte pieces, O written in 4-byte (or 16-byte) pieces.
  if (p.q_row_stride % 8 != 0 || p.k_row_stride % 8 != 0 || p.v_row_stride % 8 != 0 ||
      p.o_row_stride % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the cuda backend takes Q, K and V row strides that are multiples of 8 elements and O "
        "row strides that are multiples of 2, got ",
        p.q_row_stride, ", ", p.k_row_stride, ", ", p.v_row_stride, " and ", p.o_row_stride));
  }
  return absl::OkStatus();
}

std::string PlanFingerprint(const AttentionPlan& plan) {
  // Value-initialised by PlanAttention: no stray padding bytes in the fingerprint.
  DilatedAttentionParams key = plan.params;
  key.q = key.k = key.v = key.o = nullptr;
  key.seq_offsets = nullptr;
  std::string fingerprint(reinterpret_cast<const char*>(&key), sizeof(key));
  fingerprint.append(reinterpret_cast<const char*>(plan.seq_offsets.data()),
                     plan.seq_offsets.size() * sizeof(int64_t));
  return fingerprint;
}

FusedForwardParams BindFusedParams(const DilatedAttentionParams& p,
                                   const AttentionTensors& tensors, const void* seq_offsets) {
  FusedForwardParams params{};
  params.attn = p;
  params.attn.q = tensors.q.data;
  params.attn.k = tensors.k.data;
  params.attn.v = tensors.v.data;
  params.attn.o = tensors.o.data;
  params.attn.seq_offsets = static_cast<const int64_t*>(seq_offsets);
  params.scale_log2 = p.scale * 1.4426950408889634f;  // log2(e): scores go straight to exp2
  return params;
}

absl::Status CheckCudaTensorAlignment(const AttentionTensors& tensors) {
  // A misaligned address would fault inside the kernel and poison the CUDA context for every
  // later request: refuse it here instead.
  auto aligned = [](const void* ptr, uintptr_t to) {
    return reinterpret_cast<uintptr_t>(ptr) % to == 0;
  };
  if (!aligned(tensors.q.data, 16) || !aligned(tensors.k.data, 16) ||
      !aligned(tensors.v.data, 16) || !aligned(tensors.o.data, 4)) {
    return absl::InvalidArgumentError(
        "the cuda backend needs Q, K and V 16-byte aligned and O 4-byte aligned");
  }
  return absl::OkStatus();
}

std::string CudaDeviceArch::sm() const { return absl::StrCat("sm", major, minor); }

absl::StatusOr<CudaDeviceArch> UsableCudaDevice(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    count = 0;
  }
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", device, " does not exist (", count, " found)"));
  }
  cudaDeviceProp prop{};
  if (absl::Status s = CudaStatus(cudaGetDeviceProperties(&prop, device), "device query");
      !s.ok()) {
    return s;
  }
  const CudaDeviceArch arch{prop.major, prop.minor};
  if (arch.major < 8) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", device, " (", prop.name,
                                                      ") is sm_", arch.major, arch.minor,
                                                      "; the kernels need sm_80 or newer"));
  }
  return arch;
}

}  // namespace cuda

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaBackend(
    const CudaBackendOptions& options) {
  absl::StatusOr<cuda::CudaDeviceArch> arch = cuda::UsableCudaDevice(options.device);
  if (!arch.ok()) return arch.status();
  const char* kernel = std::getenv("DILATTN_CUDA_KERNEL");
  const bool force_mma = kernel != nullptr && std::string(kernel) == "mma";
  std::shared_ptr<GpuTileCache> cache = options.tile_cache;
  if (cache == nullptr) cache = std::make_shared<GpuTileCache>();
  return std::unique_ptr<AttentionBackend>(
      new CudaBackend(options.device, static_cast<cudaStream_t>(options.stream), arch->major,
                      force_mma, absl::StrCat("cuda-", arch->sm()), std::move(cache)));
}

}  // namespace dilattn::attention
