#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "absl/strings/str_cat.h"
#include "kernels/memory/allocator.h"

namespace dilattn::memory {
namespace {

constexpr size_t kHostAlignment = 256;

class HostAllocator final : public Allocator {
 public:
  DeviceLoc location() const override { return DeviceLoc::Host(); }
  std::string name() const override { return "host"; }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    const size_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    if (rounded < bytes) return absl::ResourceExhaustedError("host allocation size overflows");
    void* p = std::aligned_alloc(kHostAlignment, rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("out of host memory allocating ", bytes,
                                                       " bytes"));
    }
    return p;
  }
  void Free(void* ptr, size_t) override { std::free(ptr); }
};

// Set by NoteHeapFreed, taken by TakeHeapFreed.
std::atomic<bool> heap_freed{false};

}  // namespace

void NoteHeapFreed() { heap_freed.store(true, std::memory_order_relaxed); }

bool TakeHeapFreed() { return heap_freed.exchange(false, std::memory_order_relaxed); }

void TrimMallocHeap() {
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

std::string CapMallocArenas(int arenas) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  (void)arenas;
  return "malloc arenas: none, the sanitizer's allocator replaces malloc";
#elif defined(__GLIBC__)
  const char* env = std::getenv("MALLOC_ARENA_MAX");
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if ((env != nullptr && *env != '\0') ||
      (tunables != nullptr && std::strstr(tunables, "glibc.malloc.arena_max") != nullptr)) {
    return "malloc arenas: as the environment sets them";
  }
  if (arenas <= 0) return "malloc arenas: the C library's default";
  if (mallopt(M_ARENA_MAX, arenas) != 1) {
    return absl::StrCat("malloc arenas: mallopt refused a cap of ", arenas);
  }
  return absl::StrCat("malloc arenas: at most ", arenas);
#else
  return "malloc arenas: not glibc, left to the C library";
#endif
}

std::unique_ptr<Allocator> NewHostAllocator() { return std::make_unique<HostAllocator>(); }

std::unique_ptr<Allocator> NewStagingHostAllocator() {
  if (CudaDeviceCount() > 0) {
    absl::StatusOr<std::unique_ptr<Allocator>> pinned = NewPinnedHostAllocator();
    if (pinned.ok()) return *std::move(pinned);
  }
  return NewHostAllocator();
}

}  // namespace dilattn::memory
