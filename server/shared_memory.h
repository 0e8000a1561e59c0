#pragma once

// Triton's shared-memory extension. A client on the same host registers a POSIX shared-memory
// object ("system") or a CUDA IPC allocation ("cuda") under a name, then points inputs and
// outputs at byte ranges of it: tensors bypass the gRPC message, and with CUDA regions the PCIe
// bus too. System and CUDA regions share one namespace, as in Triton.
//
// A registered region is reference-counted: a request that resolved a range keeps the mapping
// alive, so unregistering never pulls memory from under a request in flight.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace dilattn::server {

enum class RegionKind { kSystem, kCuda };

// One registered region. `data` is a host mapping (system) or a device pointer (cuda).
class SharedMemoryRegion {
 public:
  struct Info {
    RegionKind kind = RegionKind::kSystem;
    std::string name;
    std::string key;        // system: the shared-memory object
    uint64_t offset = 0;    // system: where the registered range starts in the object
    uint64_t byte_size = 0;
    int device = -1;        // cuda: the device holding it
    bool pinned = false;    // system: page-locked for a GPU's copies
  };

  // `release` unmaps (or closes) the memory; `fd`, kept open for the size checks, is closed
  // after it.
  SharedMemoryRegion(Info info, std::byte* data, int fd, absl::AnyInvocable<void()> release);
  ~SharedMemoryRegion();
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const Info& info() const { return info_; }
  std::byte* data() const { return data_; }
  // Whether the object still backs the whole range (a client may shrink it; touching a mapping
  // past the object's end faults). Always true for CUDA regions.
  bool StillBacked() const;
  // Whether [a, a + a_bytes) of this region and [b, b + b_bytes) of `other` may be the same
  // bytes: two registrations of one object map it at different addresses, so system regions
  // compare the object and its offsets, CUDA regions their addresses (opening one IPC handle
  // twice gives one pointer).
  bool Overlaps(const std::byte* a, size_t a_bytes, const SharedMemoryRegion& other,
                const std::byte* b, size_t b_bytes) const;

 private:
  Info info_;
  std::byte* data_;
  uint64_t object_[2] = {0, 0};  // system: the object's st_dev and st_ino
  int fd_;  // system: the object, to check its size on every use; -1 for CUDA
  absl::AnyInvocable<void()> release_;
};

// memcpy for memory that lies in a system region. The client may shrink the object behind a
// mapping at any time, and the CPU touching a mapped page past the object's end raises SIGBUS;
// here that ends the copy with INVALID_ARGUMENT instead of the process. (A GPU's DMA from a
// page-locked region is safe: the pinned pages stay, detached from the object.) `region` names
// it in the message. Any thread; the handler is installed on first use and passes every SIGBUS
// outside these copies on to the previous disposition.
absl::Status CopyGuarded(void* dst, const void* src, size_t bytes,
                         const SharedMemoryRegion& region);

// CopyGuarded's error: `region`'s object shrank while a request used it.
absl::Status ShrunkWhileInUse(const SharedMemoryRegion& region);

// A byte range of a region that one tensor lives in.
struct SharedTensor {
  std::shared_ptr<const SharedMemoryRegion> region;  // keeps the mapping alive
  std::byte* data = nullptr;
  int device = -1;  // -1: host memory; else the CUDA device
};

struct SharedMemoryOptions {
  bool enabled = true;
  // Page-lock system regions for this CUDA device (the server's GPU), so its copies from and to
  // them run asynchronously; -1 leaves them pageable.
  int pin_for_device = -1;
  // Where set, a CUDA region's registration is refused with its status when that is not OK: once
  // the server's GPUs stopped (Engine::Available), opening a handle fails with the sticky CUDA
  // error, which would read as a bad handle.
  std::function<absl::Status()> gpus_available;
};

class SharedMemoryManager {
 public:
  explicit SharedMemoryManager(SharedMemoryOptions options) : options_(options) {}

  bool enabled() const { return options_.enabled; }

  // INVALID_ARGUMENT for a bad name, key, range or handle (naming it); ALREADY_EXISTS when the
  // name is taken; UNAVAILABLE when shared memory is switched off, or for a CUDA region once the
  // GPUs stopped.
  absl::Status RegisterSystem(absl::string_view name, absl::string_view key, uint64_t offset,
                              uint64_t byte_size);
  absl::Status RegisterCuda(absl::string_view name, absl::string_view raw_handle, int64_t device,
                            uint64_t byte_size);
  // Forgets `name` (every region of `kind` when empty); a name that is not registered, or is of
  // the other kind, is left alone and is not an error, so unregistering is idempotent.
  absl::Status Unregister(RegionKind kind, absl::string_view name);
  // The regions of `kind` (all of them, or the one named); NOT_FOUND for an unknown name.
  absl::StatusOr<std::vector<SharedMemoryRegion::Info>> Status(RegionKind kind,
                                                               absl::string_view name) const;

  // The range [offset, offset + byte_size) of region `name`; INVALID_ARGUMENT when the region is
  // unknown or the range does not fit in it. `what` names the tensor in messages.
  absl::StatusOr<SharedTensor> Resolve(absl::string_view name, int64_t offset, int64_t byte_size,
                                       absl::string_view what) const;

 private:
  absl::Status Add(std::shared_ptr<SharedMemoryRegion> region);

  const SharedMemoryOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const SharedMemoryRegion>> regions_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace dilattn::server
