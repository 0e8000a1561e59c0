#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/common/device.h"

namespace dilattn::memory {

// Raw memory of one kind. Thread-safe. Allocation failure is RESOURCE_EXHAUSTED, never an abort.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual DeviceLoc location() const = 0;
  virtual std::string name() const = 0;  // "host", "pinned-host", "cuda:0"
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Free(void* ptr, size_t bytes) = 0;
};

// Pageable host memory, 256-byte aligned.
std::unique_ptr<Allocator> NewHostAllocator();

// Page-locked host memory through the CUDA runtime (fast, asynchronous copies). FAILED_PRECONDITION
// when this build or machine has no CUDA device.
absl::StatusOr<std::unique_ptr<Allocator>> NewPinnedHostAllocator();

// Device memory on one GPU. FAILED_PRECONDITION without CUDA or without that device.
absl::StatusOr<std::unique_ptr<Allocator>> NewCudaDeviceAllocator(int device);

// Pinned when a CUDA device is present, pageable otherwise.
std::unique_ptr<Allocator> NewStagingHostAllocator();

// Hands the free pages of the C heap back to the system (malloc_trim on glibc; nothing
// elsewhere), all but those at the top of arenas other than the first, which only free() shrinks
// (see FixMallocThresholds and CapMallocArenas). glibc keeps freed blocks below its mmap
// threshold (32 MiB once raised or fixed) resident in its arenas: gRPC's message buffers,
// pageable pool buffers and the CPU path's scratch would otherwise keep the process's resident
// memory at its peak for good.
// Walks every arena under its lock: the engine calls it only when no device runs a job.
void TrimMallocHeap();
// Caps glibc's malloc arenas at `arenas` for threads that start from now on (0 leaves glibc's
// default, eight per core); nothing elsewhere. malloc_trim cannot hand back the free memory at the
// top of an arena other than the first, and glibc keeps up to its trim threshold there (64 MiB
// once glibc's own has risen; see FixMallocThresholds), so every arena a gRPC or worker thread
// made keeps its share of a past burst resident: with one arena, TrimMallocHeap reaches all of
// it, but threads may then queue for that arena's lock. Call before any thread starts.
// MALLOC_ARENA_MAX or glibc.malloc.arena_max in GLIBC_TUNABLES, where set, takes precedence;
// returns a line saying what was done, for the log.
std::string CapMallocArenas(int arenas);
// Fixes glibc's trim threshold at `trim_mib` MiB and its mmap threshold at 32 MiB (0 leaves
// glibc's dynamic thresholds); nothing elsewhere. By default glibc raises both as large blocks
// are freed, the trim threshold to 64 MiB, and an arena's free top below it stays resident
// (malloc_trim reaches only the first arena's). Fixed, every arena shrinks its top to the
// threshold at each free, so what a burst leaves in the arenas of gRPC's threads goes back
// without the lock contention of a single arena (CapMallocArenas). The mmap threshold is the one
// glibc's rises to, so no block that glibc would have served from an arena is mapped instead.
// MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or their tunables in GLIBC_TUNABLES, where set,
// take precedence; returns a line saying what was done, for the log.
std::string FixMallocThresholds(int64_t trim_mib);
// The server notes each RPC's end, whose messages go back to the heap whether or not a job ran
// for it; the engine's next idle look then has something to trim.
void NoteHeapFreed();
// Whether NoteHeapFreed was called since the last call; clears it.
bool TakeHeapFreed();

// Number of CUDA devices this process can use; 0 in a build without CUDA or on a machine without.
int CudaDeviceCount();

}  // namespace dilattn::memory
