#include "kernels/attention/cpu/thread_pool.h"

#include <atomic>
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

TEST(ThreadPool, RejectsBadSizes) {
  EXPECT_FALSE(ThreadPool::Create(0).ok());
  EXPECT_FALSE(ThreadPool::Create(100000).ok());
}

}  // namespace
}  // namespace dilattn::attention::cpu
