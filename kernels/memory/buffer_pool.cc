#include "kernels/memory/buffer_pool.h"

#include <algorithm>
#include <bit>
#include <map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/common/clock.h"

namespace dilattn::memory {
namespace internal {

class PoolCore : public std::enable_shared_from_this<PoolCore> {
 public:
  PoolCore(BufferPoolOptions options, std::unique_ptr<Allocator> allocator)
      : options_(std::move(options)), allocator_(std::move(allocator)) {}

  ~PoolCore() {
    // Every lease holds a reference, so nothing is leased by now: only cached buffers remain.
    for (auto& [size, cached] : free_) {
      for (const Cached& c : cached) allocator_->Free(c.data, size);
    }
  }

  absl::StatusOr<Buffer> Acquire(size_t bytes, absl::Time deadline) {
    if (bytes == 0) return absl::InvalidArgumentError("buffer request of 0 bytes");
    const size_t size = BufferPool::SizeClass(bytes);
    if (size == 0 || size > options_.byte_cap) {
      absl::MutexLock lock(&mu_);
      ++stats_.oversized;
      return absl::ResourceExhaustedError(absl::StrCat(
          "buffer pool '", options_.name, "': request of ", bytes,
          " bytes exceeds its cap of ", options_.byte_cap, " bytes"));
    }
    mu_.Lock();
    bool waited = false;
    while (true) {
      if (auto it = free_.find(size); it != free_.end() && !it->second.empty()) {
        void* p = it->second.back().data;  // the most recently returned: older ones age out
        it->second.pop_back();
        ++stats_.hits;
        Lease(size);
        mu_.Unlock();
        return Buffer(shared_from_this(), p, bytes, size, allocator_->location());
      }
      EvictUntilFits(size);
      if (stats_.bytes_held + size <= options_.byte_cap) {
        // Reserve under the lock, allocate outside it: the check and the claim are one step, so
        // two threads can never both pass the cap check for the same room (defect 5).
        stats_.bytes_held += size;
        ++stats_.misses;
        Lease(size);
        mu_.Unlock();
        absl::StatusOr<void*> p = allocator_->Allocate(size);
        if (!p.ok()) {
          absl::MutexLock lock(&mu_);
          stats_.bytes_held -= size;
          stats_.bytes_in_use -= size;
          --stats_.leases_outstanding;
          ++stats_.allocation_failures;
          returned_.SignalAll();  // the room reserved for it is free again
          return absl::Status(p.status().code(),
                              absl::StrCat("buffer pool '", options_.name, "': ",
                                           p.status().message()));
        }
        return Buffer(shared_from_this(), *p, bytes, size, allocator_->location());
      }
      if (!waited) {
        waited = true;
        ++stats_.waits;
      }
      if (WaitUntil(returned_, &mu_, deadline)) {
        // Out of time; one last look in case the wake-up raced the deadline.
        if (stats_.bytes_held + size <= options_.byte_cap ||
            (free_.count(size) != 0 && !free_[size].empty()) || CachedBytes() > 0) {
          continue;
        }
        if (releasing_bytes_ > 0 &&
            stats_.bytes_held - releasing_bytes_ + size <= options_.byte_cap) {
          // The room is there but an idle release is still freeing it outside the lock. It
          // signals after every buffer and always finishes, so this wait is short and bounded;
          // failing instead would refuse a request the pool can serve.
          returned_.Wait(&mu_);
          continue;
        }
        ++stats_.timeouts;
        const BufferPoolStats snapshot = stats_;
        mu_.Unlock();
        return absl::ResourceExhaustedError(absl::StrCat(
            "buffer pool '", options_.name, "' exhausted: ", bytes, " bytes requested (class ",
            size, "), ", snapshot.bytes_in_use, " of its ", options_.byte_cap,
            "-byte cap leased by ", snapshot.leases_outstanding, " buffers"));
      }
    }
  }

  void Return(void* p, size_t size) {
    const absl::Time now = MonotonicNow();
    absl::MutexLock lock(&mu_);
    free_[size].push_back({p, now});
    stats_.bytes_in_use -= size;
    --stats_.leases_outstanding;
    returned_.SignalAll();
  }

  void Trim() {
    absl::MutexLock lock(&mu_);
    for (auto& [size, cached] : free_) {
      for (const Cached& c : cached) {
        allocator_->Free(c.data, size);
        stats_.bytes_held -= size;
        ++stats_.evictions;
      }
      cached.clear();
    }
  }

  size_t ReleaseIdle(absl::Time cutoff) {
    std::vector<std::pair<void*, size_t>> idle;
    size_t bytes = 0;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [size, cached] : free_) {
        // Stable, so that the buffers kept stay in the order they were returned.
        const auto old = std::stable_partition(
            cached.begin(), cached.end(), [&](const Cached& c) { return c.returned >= cutoff; });
        for (auto it = old; it != cached.end(); ++it) {
          idle.emplace_back(it->data, size);
          bytes += size;
        }
        cached.erase(old, cached.end());
      }
      if (idle.empty()) return 0;
      releasing_bytes_ += bytes;
    }
    // Freed outside the lock: a pinned pool is shared by every GPU's thread and by the threads
    // staging requests, which must not stall behind cudaFree (it synchronizes the device) or
    // cudaFreeHost (it unpins page by page, about 0.16 s a GiB). Each buffer's bytes leave the
    // accounting as soon as it is freed, so requests waiting on the cap see the room grow.
    for (const auto& [p, size] : idle) {
      allocator_->Free(p, size);
      absl::MutexLock lock(&mu_);
      releasing_bytes_ -= size;
      stats_.bytes_held -= size;
      ++stats_.idle_releases;
      returned_.SignalAll();
    }
    return bytes;
  }

  BufferPoolStats stats() const {
    absl::MutexLock lock(&mu_);
    return stats_;
  }

  const BufferPoolOptions& options() const { return options_; }
  DeviceLoc location() const { return allocator_->location(); }

 private:
  void Lease(size_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    stats_.bytes_in_use += size;
    stats_.high_water_bytes = std::max(stats_.high_water_bytes, stats_.bytes_in_use);
    ++stats_.leases_outstanding;
  }

  // Only what Acquire could still evict: not the buffers ReleaseIdle is freeing.
  uint64_t CachedBytes() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stats_.bytes_held - stats_.bytes_in_use - releasing_bytes_;
  }

  // Frees cached buffers of other classes, largest first, until `size` fits under the cap or
  // nothing cached is left. Freed under the lock so that the cap also bounds real memory.
  void EvictUntilFits(size_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (auto it = free_.rbegin();
         it != free_.rend() && stats_.bytes_held + size > options_.byte_cap; ++it) {
      while (!it->second.empty() && stats_.bytes_held + size > options_.byte_cap) {
        allocator_->Free(it->second.back().data, it->first);
        it->second.pop_back();
        stats_.bytes_held -= it->first;
        ++stats_.evictions;
      }
    }
  }

  const BufferPoolOptions options_;
  const std::unique_ptr<Allocator> allocator_;
  mutable absl::Mutex mu_;
  absl::CondVar returned_;
  // A cached buffer and when it came back, which ReleaseIdle ages it by.
  struct Cached {
    void* data;
    absl::Time returned;
  };
  // Per size class, in the order returned.
  std::map<size_t, std::vector<Cached>> free_ ABSL_GUARDED_BY(mu_);
  BufferPoolStats stats_ ABSL_GUARDED_BY(mu_);
  uint64_t releasing_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // taken by ReleaseIdle, not yet freed
};

}  // namespace internal

Buffer::Buffer(Buffer&& other) noexcept
    : core_(std::move(other.core_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)),
      location_(other.location_) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Release();
    core_ = std::move(other.core_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    location_ = other.location_;
  }
  return *this;
}

void Buffer::Release() {
  if (data_ != nullptr) core_->Return(data_, capacity_);
  core_.reset();
  data_ = nullptr;
  size_ = capacity_ = 0;
}

absl::StatusOr<std::unique_ptr<BufferPool>> BufferPool::Create(
    BufferPoolOptions options, std::unique_ptr<Allocator> allocator) {
  if (allocator == nullptr) return absl::InvalidArgumentError("buffer pool needs an allocator");
  if (options.byte_cap == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("buffer pool '", options.name, "' needs a byte cap > 0"));
  }
  return std::unique_ptr<BufferPool>(new BufferPool(
      std::make_shared<internal::PoolCore>(std::move(options), std::move(allocator))));
}

BufferPool::~BufferPool() = default;

absl::StatusOr<Buffer> BufferPool::Acquire(size_t bytes, absl::Time deadline) {
  return core_->Acquire(bytes, deadline);
}

BufferPoolStats BufferPool::stats() const { return core_->stats(); }
DeviceLoc BufferPool::location() const { return core_->location(); }
const std::string& BufferPool::name() const { return core_->options().name; }
size_t BufferPool::byte_cap() const { return core_->options().byte_cap; }
void BufferPool::Trim() { core_->Trim(); }
size_t BufferPool::ReleaseIdle(absl::Time cutoff) { return core_->ReleaseIdle(cutoff); }

size_t BufferPool::SizeClass(size_t bytes) {
  constexpr size_t kMinClass = 256;
  if (bytes <= kMinClass) return kMinClass;
  // Four classes per power of two: round up to a multiple of a quarter of the lower power.
  const int top = std::bit_width(bytes - 1) - 1;  // 2^top < bytes <= 2^(top+1)
  const size_t step = size_t{1} << (top - 2);
  const size_t rounded = (bytes + step - 1) / step * step;
  return rounded < bytes ? 0 : rounded;
}

}  // namespace dilattn::memory
