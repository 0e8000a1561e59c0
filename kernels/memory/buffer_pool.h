#pragma once

// A thread-safe pool of reusable buffers of one memory kind (host, pinned host or one GPU).
// Requests are rounded up to size classes (four per power of two, at most 25% slack) and served
// from cached buffers of that class when possible. The pool never holds more than its byte cap;
// when a request cannot fit it frees cached buffers of other classes, then waits for leases to
// return until the caller's deadline, then fails with RESOURCE_EXHAUSTED. Cached buffers are
// otherwise kept until ReleaseIdle() frees those unused since a cutoff: without it a burst of
// unusual sizes would hold memory up to the cap for good. A Buffer is an RAII lease: it returns
// its memory when destroyed, on every path (defect 4), and it keeps the pool's core alive, so
// even a lease that outlives its BufferPool frees correctly.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/common/device.h"
#include "kernels/memory/allocator.h"

namespace dilattn::memory {

struct BufferPoolOptions {
  std::string name = "pool";
  size_t byte_cap = size_t{1} << 30;  // memory held, leased plus cached, never exceeds this
};

// A GPU pool's cap (--device-pool-mib): `requested` bytes, or for 0, 90% of the memory free on
// the device when the pool is made, leaving room for the CUDA context's own allocations.
inline size_t DevicePoolCap(size_t requested, size_t device_free_bytes) {
  return requested > 0 ? requested : device_free_bytes / 10 * 9;
}

struct BufferPoolStats {
  uint64_t bytes_in_use = 0;       // size classes currently leased
  uint64_t bytes_held = 0;         // leased plus cached
  uint64_t high_water_bytes = 0;   // max of bytes_in_use over the pool's life
  uint64_t leases_outstanding = 0;
  uint64_t hits = 0;               // served from a cached buffer
  uint64_t misses = 0;             // needed a fresh allocation
  uint64_t waits = 0;              // requests that had to wait for a lease to return
  uint64_t timeouts = 0;           // requests that failed after waiting or without a deadline
  uint64_t oversized = 0;          // requests larger than the cap: no wait could serve them
  uint64_t evictions = 0;          // cached buffers freed to make room
  uint64_t idle_releases = 0;      // cached buffers freed for going unused (ReleaseIdle)
  uint64_t allocation_failures = 0;
};

class BufferPool;
namespace internal {
class PoolCore;
}

class Buffer {
 public:
  Buffer() = default;
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { Release(); }

  void* data() const { return data_; }
  size_t size() const { return size_; }          // bytes asked for
  size_t capacity() const { return capacity_; }  // the size class actually held
  DeviceLoc location() const { return location_; }
  explicit operator bool() const { return data_ != nullptr; }

  // Returns the memory to the pool now; the Buffer becomes empty.
  void Release();

 private:
  friend class internal::PoolCore;
  Buffer(std::shared_ptr<internal::PoolCore> core, void* data, size_t size, size_t capacity,
         DeviceLoc location)
      : core_(std::move(core)), data_(data), size_(size), capacity_(capacity),
        location_(location) {}

  std::shared_ptr<internal::PoolCore> core_;
  void* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
  DeviceLoc location_;
};

class BufferPool {
 public:
  static absl::StatusOr<std::unique_ptr<BufferPool>> Create(BufferPoolOptions options,
                                                            std::unique_ptr<Allocator> allocator);
  ~BufferPool();

  // A lease of at least `bytes`. If the cap leaves no room, waits for other leases to return
  // until `deadline` (monotonic, kernels/common/clock.h; the default never waits), then
  // RESOURCE_EXHAUSTED. A request larger than the cap fails at once. bytes == 0 is
  // INVALID_ARGUMENT.
  absl::StatusOr<Buffer> Acquire(size_t bytes, absl::Time deadline = absl::InfinitePast());

  BufferPoolStats stats() const;
  DeviceLoc location() const;
  const std::string& name() const;
  size_t byte_cap() const;

  // Frees every cached (not leased) buffer.
  void Trim();

  // Frees every cached buffer returned before `cutoff` (monotonic); returns the bytes freed.
  // Acquire reuses the most recently returned buffer of a class, so buffers a workload no longer
  // needs age out while those it keeps reusing stay. Leases are never touched. Any thread.
  size_t ReleaseIdle(absl::Time cutoff);

  // The size class a request of `bytes` is rounded up to; 0 when that overflows.
  static size_t SizeClass(size_t bytes);

 private:
  explicit BufferPool(std::shared_ptr<internal::PoolCore> core) : core_(std::move(core)) {}
  std::shared_ptr<internal::PoolCore> core_;
};

}  // namespace dilattn::memory
