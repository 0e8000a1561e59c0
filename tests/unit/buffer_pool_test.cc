// Buffer pool: size classes, exact statistics, exhaustion with deadlines, eviction, idle
// release, RAII on every path, allocation failures, and many threads at once (run under
// ThreadSanitizer by test.sh).

#include "kernels/memory/buffer_pool.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/clock.h"

namespace dilattn::memory {
namespace {

using ::testing::HasSubstr;

// Counts what is live so a test can prove that nothing leaks, and can be told to fail.
class CountingAllocator final : public Allocator {
 public:
  struct Counters {
    std::atomic<int64_t> live_bytes{0};
    std::atomic<int64_t> live_buffers{0};
    std::atomic<int64_t> allocations{0};
    std::atomic<bool> fail{false};
    std::atomic<bool> slow_free{false};  // as cudaFree, which waits for the device
    // Set: Free announces itself on `free_entered` and blocks until `free_gate` is notified.
    std::atomic<bool> gated_free{false};
    absl::Notification free_entered;
    absl::Notification free_gate;
  };
  explicit CountingAllocator(Counters* c) : c_(c), host_(NewHostAllocator()) {}

  DeviceLoc location() const override { return DeviceLoc::Host(); }
  std::string name() const override { return "counting"; }
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (c_->fail) return absl::ResourceExhaustedError("planted allocation failure");
    absl::StatusOr<void*> p = host_->Allocate(bytes);
    if (p.ok()) {
      c_->live_bytes += static_cast<int64_t>(bytes);
      ++c_->live_buffers;
      ++c_->allocations;
    }
    return p;
  }
  void Free(void* p, size_t bytes) override {
    if (c_->slow_free) absl::SleepFor(absl::Microseconds(100));
    if (c_->gated_free) {
      if (!c_->free_entered.HasBeenNotified()) c_->free_entered.Notify();
      c_->free_gate.WaitForNotification();
    }
    c_->live_bytes -= static_cast<int64_t>(bytes);
    --c_->live_buffers;
    host_->Free(p, bytes);
  }

 private:
  Counters* c_;
  std::unique_ptr<Allocator> host_;
};

std::unique_ptr<BufferPool> MakePool(CountingAllocator::Counters* c, size_t cap) {
  auto pool = BufferPool::Create({"test", cap}, std::make_unique<CountingAllocator>(c));
  EXPECT_TRUE(pool.ok());
  return *std::move(pool);
}

TEST(BufferPool, SizeClassesAreWithinAQuarter) {
  EXPECT_EQ(BufferPool::SizeClass(1), 256u);
  EXPECT_EQ(BufferPool::SizeClass(256), 256u);
  EXPECT_EQ(BufferPool::SizeClass(257), 320u);
  EXPECT_EQ(BufferPool::SizeClass(600), 640u);
  EXPECT_EQ(BufferPool::SizeClass(1000), 1024u);
  EXPECT_EQ(BufferPool::SizeClass(1025), 1280u);
  for (size_t b = 1; b < (size_t{1} << 22); b = b * 3 / 2 + 7) {
    const size_t c = BufferPool::SizeClass(b);
    ASSERT_GE(c, b);
    ASSERT_LE(c, std::max<size_t>(256, b + b / 4 + 1)) << b;
    ASSERT_EQ(BufferPool::SizeClass(c), c) << "classes are fixed points";
  }
  EXPECT_EQ(BufferPool::SizeClass(~size_t{0} - 5), 0u) << "overflow is reported as 0";
}

TEST(BufferPool, ReusesAndCountsExactly) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 1 << 20);
  {
    absl::StatusOr<Buffer> a = pool->Acquire(1000);
    ASSERT_TRUE(a.ok());
    EXPECT_EQ(a->size(), 1000u);
    EXPECT_EQ(a->capacity(), 1024u);
    std::memset(a->data(), 0x5a, a->size());
    absl::StatusOr<Buffer> b = pool->Acquire(3000);
    ASSERT_TRUE(b.ok());
    const BufferPoolStats s = pool->stats();
    EXPECT_EQ(s.bytes_in_use, 1024u + 3072u);
    EXPECT_EQ(s.bytes_held, 1024u + 3072u);
    EXPECT_EQ(s.leases_outstanding, 2u);
    EXPECT_EQ(s.misses, 2u);
    EXPECT_EQ(s.hits, 0u);
  }
  BufferPoolStats s = pool->stats();
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.bytes_held, 4096u);
  EXPECT_EQ(s.high_water_bytes, 4096u);
  EXPECT_EQ(s.leases_outstanding, 0u);

  absl::StatusOr<Buffer> again = pool->Acquire(900);  // same class as 1000
  ASSERT_TRUE(again.ok());
  s = pool->stats();
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 2u);
  EXPECT_EQ(c.allocations.load(), 2);
  again->Release();
  EXPECT_FALSE(*again);
  EXPECT_EQ(pool->stats().bytes_in_use, 0u);

  pool->Trim();
  EXPECT_EQ(pool->stats().bytes_held, 0u);
  EXPECT_EQ(c.live_bytes.load(), 0);
}

TEST(BufferPool, MovesTransferTheLease) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 1 << 20);
  Buffer outer;
  {
    absl::StatusOr<Buffer> a = pool->Acquire(512);
    ASSERT_TRUE(a.ok());
    Buffer moved = *std::move(a);
    outer = std::move(moved);
  }
  EXPECT_EQ(pool->stats().leases_outstanding, 1u);
  outer = Buffer();
  EXPECT_EQ(pool->stats().leases_outstanding, 0u);
}

TEST(BufferPool, RejectsZeroAndOversizedRequests) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 4096);
  EXPECT_EQ(pool->Acquire(0).status().code(), absl::StatusCode::kInvalidArgument);
  const absl::Status s = pool->Acquire(5000).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("exceeds its cap of 4096"));
  // A request no wait could serve is the client's size, not the pool running out.
  EXPECT_EQ(pool->stats().oversized, 1u);
  EXPECT_EQ(pool->stats().timeouts, 0u);
}

TEST(BufferPool, ExhaustionHonoursTheDeadlineThenFails) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 4096);
  absl::StatusOr<Buffer> held = pool->Acquire(4096);
  ASSERT_TRUE(held.ok());

  // No deadline: fails at once.
  absl::Time start = MonotonicNow();
  EXPECT_EQ(pool->Acquire(1024).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_LT(MonotonicNow() - start, absl::Milliseconds(50));

  // A deadline: waits that long, not less, not much more.
  start = MonotonicNow();
  const absl::Status s = pool->Acquire(1024, start + absl::Milliseconds(80)).status();
  const absl::Duration waited = MonotonicNow() - start;
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("exhausted"));
  EXPECT_GE(waited, absl::Milliseconds(80));
  EXPECT_LT(waited, absl::Milliseconds(1000));
  const BufferPoolStats stats = pool->stats();
  EXPECT_EQ(stats.timeouts, 2u);
  EXPECT_EQ(stats.waits, 2u);

  // A return during the wait satisfies it.
  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(30));
    held->Release();
  });
  absl::StatusOr<Buffer> got = pool->Acquire(2048, MonotonicNow() + absl::Seconds(10));
  releaser.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_LE(pool->stats().bytes_held, 4096u);
}

TEST(BufferPool, EvictsCachedBuffersOfOtherClassesToFit) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 8192);
  ASSERT_TRUE(pool->Acquire(4096).ok());  // cached after release
  ASSERT_TRUE(pool->Acquire(2048).ok());
  EXPECT_EQ(pool->stats().bytes_held, 6144u);
  absl::StatusOr<Buffer> big = pool->Acquire(8192);
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(pool->stats().evictions, 2u);
  EXPECT_EQ(c.live_bytes.load(), 8192);
}

TEST(BufferPool, AllocationFailureLeavesNoTrace) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 1 << 20);
  c.fail = true;
  const absl::Status s = pool->Acquire(1000).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("planted"));
  const BufferPoolStats stats = pool->stats();
  EXPECT_EQ(stats.bytes_held, 0u);
  EXPECT_EQ(stats.bytes_in_use, 0u);
  EXPECT_EQ(stats.leases_outstanding, 0u);
  EXPECT_EQ(stats.allocation_failures, 1u);
  c.fail = false;
  EXPECT_TRUE(pool->Acquire(1000).ok());
}

TEST(BufferPool, LeaseMayOutliveThePool) {
  CountingAllocator::Counters c;
  Buffer survivor;
  {
    auto pool = MakePool(&c, 1 << 20);
    absl::StatusOr<Buffer> b = pool->Acquire(777);
    ASSERT_TRUE(b.ok());
    survivor = *std::move(b);
    ASSERT_TRUE(pool->Acquire(100).ok());
  }
  EXPECT_EQ(c.live_buffers.load(), 2);
  std::memset(survivor.data(), 1, survivor.size());
  survivor.Release();
  EXPECT_EQ(c.live_buffers.load(), 0) << "the last lease frees the pool's memory";
  EXPECT_EQ(c.live_bytes.load(), 0);
}

// This process's resident memory (VmRSS) in KiB; -1 where /proc does not say.
long ResidentKiB() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  }
  return -1;
}

TEST(TrimMallocHeap, HandsFreedHeapPagesBack) {
#if !defined(__GLIBC__) || defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "malloc_trim acts on glibc's own heap, which a sanitizer's allocator replaces";
#endif
  if (ResidentKiB() < 0) GTEST_SKIP() << "no /proc/self/status";
  // 4096 blocks of 48 KiB (below glibc's mmap threshold, so in the heap), each followed by a small
  // block that stays: the freed ones cannot merge into the heap's top, which free() would shrink.
  constexpr size_t kBlock = 48 << 10;
  std::vector<void*> blocks, pins;
  for (int i = 0; i < 4096; ++i) {
    blocks.push_back(std::malloc(kBlock));
    ASSERT_NE(blocks.back(), nullptr);
    std::memset(blocks.back(), 1, kBlock);
    pins.push_back(std::malloc(64));
  }
  for (void* p : blocks) std::free(p);
  const long before = ResidentKiB();
  TrimMallocHeap();
  const long after = ResidentKiB();
  for (void* p : pins) std::free(p);
  EXPECT_LT(after, before - 100 * 1024) << "192 MiB freed into the heap; resident KiB " << before
                                        << " before the trim, " << after << " after";
}

// On a thread of its own (so in an arena other than the first): a 30 MiB block freed, which
// raises glibc's own mmap threshold to 30 MiB and its trim threshold to 60, as a server's first
// large messages do; then 48 MiB of 1 MiB blocks, freed last to first into the arena's top, which
// free() leaves resident below the trim threshold.
void FreeAtTheTopOfAnArena() {
  void* volatile large = std::malloc(30 << 20);  // volatile: kept, though unused
  std::memset(large, 1, 30 << 20);
  std::free(large);
  std::vector<void*> blocks;
  for (int i = 0; i < 48; ++i) {
    blocks.push_back(std::malloc(1 << 20));
    std::memset(blocks.back(), 1, 1 << 20);
  }
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) std::free(*it);
}

// glibc's malloc_trim leaves the free top of every arena but the first resident; a capped
// process has only the first, so the trim reaches what a gRPC or worker thread freed.
TEST(TrimMallocHeap, WithOneArenaReachesWhatAnotherThreadFreed) {
#if !defined(__GLIBC__) || defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "malloc arenas and malloc_trim are glibc's, which a sanitizer's allocator "
                  "replaces";
#endif
  if (ResidentKiB() < 0) GTEST_SKIP() << "no /proc/self/status";
  if (std::getenv("MALLOC_ARENA_MAX") != nullptr || std::getenv("GLIBC_TUNABLES") != nullptr) {
    GTEST_SKIP() << "the environment sets malloc's options, and the cap defers to it";
  }
  // A fresh process: this one's other tests have made arenas that a new thread could take.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        EXPECT_THAT(CapMallocArenas(1), HasSubstr("at most 1"));
        std::thread worker(FreeAtTheTopOfAnArena);
        worker.join();
        const long before = ResidentKiB();
        TrimMallocHeap();
        const long after = ResidentKiB();
        std::fprintf(stderr, "resident KiB %ld before the trim, %ld after\n", before, after);
        std::_Exit(after < before - 32 * 1024 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

// With the thresholds fixed, an arena hands back its free top at each free, past the trim
// threshold: what a thread of its own freed leaves without any malloc_trim.
TEST(FixMallocThresholds, AnotherThreadsArenaShrinksAsItFrees) {
#if !defined(__GLIBC__) || defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "malloc's thresholds are glibc's, which a sanitizer's allocator replaces";
#endif
  if (ResidentKiB() < 0) GTEST_SKIP() << "no /proc/self/status";
  for (const char* name :
       {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX"}) {
    if (std::getenv(name) != nullptr) {
      GTEST_SKIP() << name << " sets malloc's options, and the flag defers to it";
    }
  }
  // A fresh process: thresholds and arenas that this one's other tests left would decide.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        EXPECT_THAT(FixMallocThresholds(8), HasSubstr("above 8 MiB"));
        const long start = ResidentKiB();
        std::thread worker(FreeAtTheTopOfAnArena);
        worker.join();
        const long end = ResidentKiB();
        std::fprintf(stderr, "resident KiB %ld before the thread, %ld after\n", start, end);
        std::_Exit(end < start + 16 * 1024 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

TEST(BufferPool, ManyThreadsNeverExceedTheCapOrShareABuffer) {
  constexpr int kThreads = 16;
  constexpr int kCycles = 10000;
  constexpr size_t kCap = 64 * 1024;
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, kCap);
  absl::Mutex mu;
  std::set<void*> live;  // buffers leased right now, across threads
  std::atomic<int> overlaps{0};
  std::atomic<int64_t> over_cap{0};
  std::atomic<int64_t> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCycles; ++i) {
        const size_t bytes = 256 + static_cast<size_t>((t * 7919 + i * 104729) % 8192);
        absl::StatusOr<Buffer> b = pool->Acquire(bytes, MonotonicNow() + absl::Seconds(30));
        if (!b.ok()) {
          ++failures;
          continue;
        }
        {
          absl::MutexLock lock(&mu);
          if (!live.insert(b->data()).second) ++overlaps;
        }
        static_cast<unsigned char*>(b->data())[0] = static_cast<unsigned char>(t);
        static_cast<unsigned char*>(b->data())[b->size() - 1] = static_cast<unsigned char>(i);
        if (c.live_bytes.load() > static_cast<int64_t>(kCap)) ++over_cap;
        {
          absl::MutexLock lock(&mu);
          live.erase(b->data());
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(over_cap.load(), 0);
  EXPECT_EQ(failures.load(), 0);
  const BufferPoolStats s = pool->stats();
  EXPECT_EQ(s.hits + s.misses, static_cast<uint64_t>(kThreads) * kCycles);
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.leases_outstanding, 0u);
  EXPECT_LE(s.high_water_bytes, kCap);
  EXPECT_EQ(static_cast<int64_t>(s.bytes_held), c.live_bytes.load());
  pool.reset();
  EXPECT_EQ(c.live_bytes.load(), 0);
  EXPECT_EQ(c.live_buffers.load(), 0);
}

// Cached buffers returned before the cutoff are freed through the allocator, newer ones and leases
// are kept, and a class keeps serving its most recently returned buffer.
TEST(BufferPool, ReleaseIdleFreesOnlyBuffersCachedBeforeTheCutoff) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 1 << 20);
  absl::StatusOr<Buffer> old_small = pool->Acquire(1000);  // class 1024
  absl::StatusOr<Buffer> new_small = pool->Acquire(1000);
  absl::StatusOr<Buffer> leased = pool->Acquire(2048);  // leased throughout
  ASSERT_TRUE(old_small.ok() && new_small.ok() && leased.ok());
  void* const newer = new_small->data();
  old_small->Release();
  ASSERT_TRUE(pool->Acquire(4096).ok());  // cached
  absl::SleepFor(absl::Milliseconds(5));
  const absl::Time cutoff = MonotonicNow();
  absl::SleepFor(absl::Milliseconds(5));
  new_small->Release();
  ASSERT_TRUE(pool->Acquire(8192).ok());  // cached
  ASSERT_EQ(pool->stats().bytes_held, 1024u + 1024u + 2048u + 4096u + 8192u);

  EXPECT_EQ(pool->ReleaseIdle(cutoff), 1024u + 4096u);
  BufferPoolStats s = pool->stats();
  EXPECT_EQ(s.bytes_held, 1024u + 2048u + 8192u);
  EXPECT_EQ(s.bytes_in_use, 2048u);
  EXPECT_EQ(s.leases_outstanding, 1u);
  EXPECT_EQ(s.idle_releases, 2u);
  EXPECT_EQ(s.evictions, 0u) << "an idle release is not an eviction to make room";
  EXPECT_EQ(c.live_bytes.load(), 1024 + 2048 + 8192) << "the memory went back to the allocator";
  EXPECT_EQ(c.live_buffers.load(), 3);

  // Nothing else is older than the cutoff.
  EXPECT_EQ(pool->ReleaseIdle(cutoff), 0u);
  EXPECT_EQ(pool->stats().idle_releases, 2u);

  // The kept buffer of the class serves the next request of it.
  absl::StatusOr<Buffer> again = pool->Acquire(1000);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->data(), newer);
  EXPECT_EQ(pool->stats().hits, 1u);

  // A cutoff in the future takes every cached buffer, but no lease.
  EXPECT_EQ(pool->ReleaseIdle(absl::InfiniteFuture()), 8192u);
  s = pool->stats();
  EXPECT_EQ(s.bytes_held, 1024u + 2048u);
  EXPECT_EQ(s.bytes_in_use, 1024u + 2048u);
  EXPECT_EQ(s.idle_releases, 3u);
  EXPECT_EQ(c.live_bytes.load(), 1024 + 2048);
  std::memset(leased->data(), 0x33, leased->size());  // still the lease's (ASan would object)
  std::memset(again->data(), 0x44, again->size());
  leased->Release();
  again->Release();
  EXPECT_EQ(pool->ReleaseIdle(absl::InfiniteFuture()), 1024u + 2048u);
  EXPECT_EQ(pool->stats().bytes_held, 0u);
  EXPECT_EQ(c.live_bytes.load(), 0);
  EXPECT_EQ(c.live_buffers.load(), 0);
}

// The most recently returned buffer of a class is reused, so one that a steady workload keeps
// using is never the one that ages out.
TEST(BufferPool, ReuseTakesTheMostRecentlyReturnedBuffer) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 1 << 20);
  absl::StatusOr<Buffer> a = pool->Acquire(4000);
  absl::StatusOr<Buffer> b = pool->Acquire(4000);
  ASSERT_TRUE(a.ok() && b.ok());
  void* const first = a->data();
  void* const second = b->data();
  a->Release();
  absl::SleepFor(absl::Milliseconds(5));
  const absl::Time cutoff = MonotonicNow();
  absl::SleepFor(absl::Milliseconds(5));
  b->Release();
  for (int i = 0; i < 3; ++i) {  // the steady workload: one buffer at a time
    absl::StatusOr<Buffer> again = pool->Acquire(4000);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->data(), second);
  }
  // `second` went back after the cutoff (again and again); only `first` has aged.
  EXPECT_EQ(pool->ReleaseIdle(cutoff), 4096u);
  absl::StatusOr<Buffer> kept = pool->Acquire(4000);
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ(kept->data(), second);
  EXPECT_NE(kept->data(), first);
}

// A waiter is served when a lease comes back, not at its deadline's last look.
TEST(BufferPool, AReturnWakesAWaiterLongBeforeItsDeadline) {
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, 4096);
  absl::StatusOr<Buffer> held = pool->Acquire(4096);
  ASSERT_TRUE(held.ok());
  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(30));
    held->Release();
  });
  const absl::Time start = MonotonicNow();
  absl::StatusOr<Buffer> got = pool->Acquire(2048, start + absl::Seconds(10));
  const absl::Duration waited = MonotonicNow() - start;
  releaser.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_LT(waited, absl::Seconds(3));
  EXPECT_EQ(pool->stats().waits, 1u);
  EXPECT_EQ(pool->stats().timeouts, 0u);
}

// The cap is full only of buffers an idle release is still freeing outside the lock: a request
// that may not wait gets its buffer once they are freed, rather than RESOURCE_EXHAUSTED for
// memory that is on its way out (the engine's idle look must not fail a stream's lease).
TEST(BufferPool, ARequestDuringAnIdleReleaseWaitsForItsFrees) {
  constexpr size_t kCap = 8192;
  CountingAllocator::Counters c;
  auto pool = MakePool(&c, kCap);
  {
    absl::StatusOr<Buffer> a = pool->Acquire(4096);
    absl::StatusOr<Buffer> b = pool->Acquire(4096);
    ASSERT_TRUE(a.ok() && b.ok());
  }
  ASSERT_EQ(pool->stats().bytes_held, kCap);
  c.gated_free = true;
  std::thread releaser([&] { EXPECT_EQ(pool->ReleaseIdle(absl::InfiniteFuture()), kCap); });
  c.free_entered.WaitForNotification();  // both buffers are out of the cache, none freed yet
  std::atomic<bool> answered{false};
  absl::Status status;
  std::thread requester([&] {
    // Another class than the cached ones, and no deadline: nothing to reuse or evict.
    absl::StatusOr<Buffer> fresh = pool->Acquire(2048, absl::InfinitePast());
    status = fresh.status();
    answered = true;
  });
  absl::SleepFor(absl::Milliseconds(50));
  const bool answered_before_the_frees = answered.load();
  c.gated_free = false;
  c.free_gate.Notify();
  requester.join();
  releaser.join();
  EXPECT_FALSE(answered_before_the_frees) << "answered before any buffer was freed: " << status;
  EXPECT_TRUE(status.ok()) << status;
  const BufferPoolStats s = pool->stats();
  EXPECT_EQ(s.timeouts, 0u);
  EXPECT_EQ(s.idle_releases, 2u);
  EXPECT_EQ(s.bytes_held, 2048u);
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(c.live_bytes.load(), 2048);
}

// Idle releases racing leases, returns, evictions and requests that fail at once or wait: the
// cap still bounds real memory, no buffer is shared or freed twice, and the counts add up. A
// request without a deadline that finds the cap full while a release frees buffers outside the
// lock waits for those frees and does not spin on them.
TEST(BufferPool, ReleaseIdleRacesLeasesSafely) {
  constexpr int kThreads = 8;
  constexpr int kCycles = 1500;
  constexpr size_t kCap = 32 * 1024;
  CountingAllocator::Counters c;
  c.slow_free = true;  // widens the window in which a release frees outside the lock
  auto pool = MakePool(&c, kCap);
  absl::Mutex mu;
  std::set<void*> live;
  std::atomic<int> overlaps{0};
  std::atomic<int64_t> over_cap{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> released_bytes{0};
  std::thread releaser([&] {
    while (!stop.load()) {
      released_bytes += pool->ReleaseIdle(MonotonicNow() - absl::Microseconds(50));
      if (c.live_bytes.load() > static_cast<int64_t>(kCap)) ++over_cap;
    }
  });
  std::vector<std::thread> threads;
  std::atomic<uint64_t> requests{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCycles; ++i) {
        const size_t bytes = 256 + static_cast<size_t>((t * 7919 + i * 104729) % 6144);
        // Every other thread asks without a deadline: it fails at once when the cap is full.
        const absl::Time deadline =
            t % 2 == 0 ? absl::InfinitePast() : MonotonicNow() + absl::Seconds(30);
        ++requests;
        absl::StatusOr<Buffer> b = pool->Acquire(bytes, deadline);
        if (!b.ok()) continue;
        {
          absl::MutexLock lock(&mu);
          if (!live.insert(b->data()).second) ++overlaps;
        }
        std::memset(b->data(), t, b->size());
        if (c.live_bytes.load() > static_cast<int64_t>(kCap)) ++over_cap;
        {
          absl::MutexLock lock(&mu);
          live.erase(b->data());
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  stop = true;
  releaser.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(over_cap.load(), 0);
  BufferPoolStats s = pool->stats();
  EXPECT_EQ(s.hits + s.misses + s.timeouts, requests.load());
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.leases_outstanding, 0u);
  EXPECT_GT(s.idle_releases, 0u);
  EXPECT_EQ(static_cast<int64_t>(s.bytes_held), c.live_bytes.load());
  // Every buffer allocated was freed once, by an idle release, an eviction, or still cached.
  EXPECT_EQ(s.misses, s.idle_releases + s.evictions + static_cast<uint64_t>(c.live_buffers.load()));
  released_bytes += pool->ReleaseIdle(absl::InfiniteFuture());
  EXPECT_EQ(pool->stats().bytes_held, 0u);
  EXPECT_EQ(c.live_bytes.load(), 0);
  EXPECT_GT(released_bytes.load(), 0u);
}

}  // namespace
}  // namespace dilattn::memory
