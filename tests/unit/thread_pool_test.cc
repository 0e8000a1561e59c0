#include "kernels/attention/cpu/thread_pool.h"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace dilattn::attention::cpu {
namespace {

TEST(ThreadPool, RunsEveryItemOnceWithDistinctWorkers) {
  for (int threads : {1, 2, 5}) {
    auto pool = ThreadPool::Create(threads);
    ASSERT_TRUE(pool.ok());
    EXPECT_EQ((*pool)->size(), threads);
    for (int64_t count : {0, 1, 7, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(count));
      std::vector<std::atomic<int>> in_worker(static_cast<size_t>(threads));
      std::atomic<int> clashes{0};
      (*pool)->ParallelFor(count, [&](int64_t i, int worker) {
        ASSERT_GE(worker, 0);
        ASSERT_LT(worker, threads);
        if (in_worker[static_cast<size_t>(worker)].fetch_add(1) != 0) ++clashes;
        ++hits[static_cast<size_t>(i)];
        in_worker[static_cast<size_t>(worker)].fetch_sub(1);
      });
      for (auto& h : hits) ASSERT_EQ(h.load(), 1);
      EXPECT_EQ(clashes.load(), 0);
    }
  }
}

TEST(ThreadPool, ManyRoundsInARow) {
  auto pool = ThreadPool::Create(4);
  ASSERT_TRUE(pool.ok());
  std::atomic<int64_t> sum{0};
  for (int round = 0; round < 2000; ++round) {
    (*pool)->ParallelFor(3, [&](int64_t i, int) { sum += i; });
  }
  EXPECT_EQ(sum.load(), 2000 * 3);
}

// Under a limit, ParallelFor uses only that many of the pool's threads, the caller first: a
// limit of 1 runs everything on the calling thread; items fewer than the threads use no more
// threads than items; and the limit ends with its scope.
TEST(ThreadPool, ALimitCapsTheThreadsThatTakePart) {
  auto pool = ThreadPool::Create(4);
  ASSERT_TRUE(pool.ok());
  auto workers_used = [&](int64_t count) {
    std::vector<std::atomic<int>> used(4);
    std::atomic<int> off_caller{0};
    const std::thread::id caller = std::this_thread::get_id();
    (*pool)->ParallelFor(count, [&](int64_t, int worker) {
      ++used[static_cast<size_t>(worker)];
      if (worker == 0 && std::this_thread::get_id() != caller) ++off_caller;
      // Long enough that every thread allowed to take part does.
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    });
    EXPECT_EQ(off_caller.load(), 0);
    int highest = -1;
    for (int w = 0; w < 4; ++w) {
      if (used[static_cast<size_t>(w)].load() > 0) highest = w;
    }
    return highest + 1;
  };
  {
    ThreadPool::ScopedLimit one(**pool, 1);
    EXPECT_EQ(workers_used(50), 1);
  }
  {
    ThreadPool::ScopedLimit two(**pool, 2);
    EXPECT_LE(workers_used(50), 2);
    ThreadPool::ScopedLimit none(**pool, 0);  // read as 1
    EXPECT_EQ(workers_used(50), 1);
  }
  EXPECT_LE(workers_used(2), 2);
  EXPECT_GE(workers_used(400), 3);  // all four are allowed again
  // Limits that change from round to round neither lose items nor hang.
  std::atomic<int64_t> sum{0};
  for (int round = 0; round < 2000; ++round) {
    ThreadPool::ScopedLimit limit(**pool, 1 + round % 4);
    (*pool)->ParallelFor(5, [&](int64_t i, int worker) {
      EXPECT_LT(worker, 1 + round % 4);
      sum += i;
    });
  }
  EXPECT_EQ(sum.load(), 2000 * 10);
}

TEST(ThreadPool, RejectsBadSizes) {
  EXPECT_FALSE(ThreadPool::Create(0).ok());
  EXPECT_FALSE(ThreadPool::Create(100000).ok());
}

}  // namespace
}  // namespace dilattn::attention::cpu
