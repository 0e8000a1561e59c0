#include <atomic>
#include <cstdint>
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

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
namespace {
// Whether the environment sets a malloc option itself: its variable, or the tunable in
// GLIBC_TUNABLES. glibc reads both at startup, and the server's flag then defers to them.
bool EnvironmentSets(const char* variable, const char* tunable) {
  const char* env = std::getenv(variable);
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  return (env != nullptr && *env != '\0') ||
         (tunables != nullptr && std::strstr(tunables, tunable) != nullptr);
}
}  // namespace
#endif

std::string CapMallocArenas(int arenas) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  (void)arenas;
  return "malloc arenas: none, the sanitizer's allocator replaces malloc";
#elif defined(__GLIBC__)
  if (EnvironmentSets("MALLOC_ARENA_MAX", "glibc.malloc.arena_max")) {
    return "malloc arenas: as the environment sets them";
  }
  if (arenas <= 0) return "malloc arenas: the C library's default";
  if (mallopt(M_ARENA_MAX, arenas) != 1) {
    return absl::StrCat("malloc arenas: mallopt refused a cap of ", arenas);
  }
  return absl::StrCat("malloc arenas: at most ", arenas);
#else
  (void)arenas;
  return "malloc arenas: not glibc, left to the C library";
#endif
}

std::string FixMallocThresholds(int64_t trim_mib) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  (void)trim_mib;
  return "malloc thresholds: none, the sanitizer's allocator replaces malloc";
#elif defined(__GLIBC__)
  if (EnvironmentSets("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold") ||
      EnvironmentSets("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold")) {
    return "malloc thresholds: as the environment sets them";
  }
  if (trim_mib <= 0) return "malloc thresholds: the C library's, rising with large frees";
  // Where glibc's own threshold stops rising (32 MiB on 64-bit): a block below it comes from an
  // arena as it would once the server's first large messages had raised it, so fixing the
  // thresholds costs no page faults that glibc's default would have saved.
  constexpr int kMmapThreshold = 32 << 20;
  const int64_t trim_bytes = trim_mib << 20;
  if (trim_bytes > INT32_MAX || mallopt(M_MMAP_THRESHOLD, kMmapThreshold) != 1 ||
      mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim_bytes)) != 1) {
    return absl::StrCat("malloc thresholds: mallopt refused a trim threshold of ", trim_mib,
                        " MiB");
  }
  return absl::StrCat("malloc thresholds: every arena hands back a free top above ", trim_mib,
                      " MiB at once; blocks of 32 MiB or more are mapped");
#else
  (void)trim_mib;
  return "malloc thresholds: not glibc, left to the C library";
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
