// Inputs copied in the background (server/input_fill.h): rows become visible in order and
// complete, a fill destroyed early stops, and an executor given a request whose copy is still
// running waits for it: its output equals the same job's with the inputs in place, where reading
// too early would read the NaN the memory was poisoned with. Runs without a GPU, and in CI under
// ASan/UBSan and ThreadSanitizer.

#include "server/input_fill.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/random/random.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "kernels/common/clock.h"
#include "server/executor.h"

namespace dilattn::server {
namespace {

std::vector<std::string> RandomTensors(int count, size_t bytes, absl::BitGen& gen) {
  std::vector<std::string> out(static_cast<size_t>(count), std::string(bytes, '\0'));
  for (std::string& t : out) {
    for (char& c : t) c = static_cast<char>(absl::Uniform<unsigned>(gen, 0, 256));
  }
  return out;
}

// A copy from `src` that sleeps now and then, so that the threads interleave.
InputFill::CopyFn SlowCopy(const std::vector<std::string>* src, absl::Duration pause) {
  return [src, pause](int t, size_t offset, size_t bytes, void* dst) {
    absl::SleepFor(pause);
    std::memcpy(dst, (*src)[static_cast<size_t>(t)].data() + offset, bytes);
  };
}

TEST(InputFill, RowsArriveInOrderAndComplete) {
  absl::BitGen gen;
  for (int round = 0; round < 6; ++round) {
    const int64_t rows = absl::Uniform<int64_t>(gen, 1, 2000);
    const size_t row_bytes = absl::Uniform<size_t>(gen, 1, 1000);
    const int tensors = absl::Uniform<int>(gen, 1, 4);
    const std::vector<std::string> src = RandomTensors(tensors, rows * row_bytes, gen);
    std::vector<std::string> dst(static_cast<size_t>(tensors), std::string(rows * row_bytes, 'x'));
    std::vector<void*> dsts;
    for (std::string& d : dst) dsts.push_back(d.data());
    std::unique_ptr<InputFill> fill =
        InputFill::Start(rows, row_bytes, dsts, SlowCopy(&src, absl::Microseconds(20)),
                         absl::Uniform<int>(gen, 1, 9),
                         absl::Uniform<size_t>(gen, 1, 20000));  // items cut rows anywhere
    ASSERT_EQ(fill->rows(), rows);
    // Whatever WaitForRows returns for is in place in every tensor at that moment.
    for (int64_t want = 0; want < rows; want += absl::Uniform<int64_t>(gen, 1, rows / 4 + 2)) {
      fill->WaitForRows(want);
      for (int t = 0; t < tensors; ++t) {
        ASSERT_EQ(
            0, std::memcmp(dst[static_cast<size_t>(t)].data(), src[static_cast<size_t>(t)].data(),
                           static_cast<size_t>(want) * row_bytes))
            << "rows [0, " << want << ") of tensor " << t << " in round " << round;
      }
    }
    fill->WaitForRows(rows + 5);  // more than there are: all of them
    EXPECT_TRUE(fill->complete());
    EXPECT_EQ(dst, src);
  }
}

TEST(InputFill, NothingToCopyIsComplete) {
  std::unique_ptr<InputFill> none = InputFill::Start(
      0, 64, {nullptr}, [](int, size_t, size_t, void*) { ADD_FAILURE() << "copied"; }, 4);
  none->WaitForAll();
  EXPECT_TRUE(none->complete());
  std::unique_ptr<InputFill> no_tensors = InputFill::Start(
      10, 64, {}, [](int, size_t, size_t, void*) { ADD_FAILURE() << "copied"; }, 4);
  no_tensors->WaitForAll();
  EXPECT_TRUE(no_tensors->complete());
}

TEST(InputFill, DestroyedEarlyStopsCopying) {
  // 64 chunks of one 4 KiB item each, a millisecond per item on one thread: destroyed at once,
  // the fill ends after the item in progress instead of copying the other 63.
  std::atomic<int> copied{0};
  std::string dst(64 * 4096, '\0');
  absl::Time before = MonotonicNow();
  {
    std::unique_ptr<InputFill> fill = InputFill::Start(
        64, 4096, {dst.data()},
        [&copied](int, size_t, size_t, void*) {
          absl::SleepFor(absl::Milliseconds(1));
          copied.fetch_add(1);
        },
        1);
  }
  EXPECT_LT(copied.load(), 8);
  EXPECT_LT(MonotonicNow() - before, absl::Milliseconds(200));
}

// A dilated-attention request of `tokens` tokens in fp32 whose Q, K, V are `src` (three tensors),
// viewed in `memory`: either copied there already, or poisoned with NaN and filled slowly.
std::unique_ptr<InferenceRequest> AttentionRequest(int64_t tokens, int64_t heads, int64_t dim,
                                                   const std::vector<std::string>& src,
                                                   std::vector<std::string>* memory, bool slow) {
  auto r = std::make_unique<InferenceRequest>();
  r->options.dilated.segment_lengths = {32, 64};
  r->options.dilated.dilation_rates = {1, 2};
  r->dtype = attention::DType::kFloat32;
  r->batch = 1;
  r->seq_len = tokens;
  r->heads = heads;
  r->head_dim = dim;
  r->tensor_bytes = src[0].size();
  std::vector<void*> dsts;
  for (size_t t = 0; t < 3; ++t) {
    std::string& m = (*memory)[t];
    if (slow) {
      const float nan = std::nanf("");
      for (size_t at = 0; at + sizeof(float) <= m.size(); at += sizeof(float)) {
        std::memcpy(m.data() + at, &nan, sizeof(float));
      }
    } else {
      m = src[t];
    }
    dsts.push_back(m.data());
  }
  r->q = (*memory)[0];
  r->k = (*memory)[1];
  r->v = (*memory)[2];
  if (slow) {
    r->fill = InputFill::Start(tokens, r->tensor_bytes / static_cast<size_t>(tokens), dsts,
                               SlowCopy(&src, absl::Milliseconds(2)), 2);
  }
  return r;
}

std::vector<float> RunJob(Executor& executor, std::vector<std::unique_ptr<InferenceRequest>> rs) {
  Job job;
  job.start = MonotonicNow();
  job.shape.dtype = rs.front()->dtype;
  job.shape.num_heads = rs.front()->heads;
  job.shape.head_dim = rs.front()->head_dim;
  for (const auto& r : rs) job.shape.seq_lengths.push_back(r->seq_len);
  job.requests = std::move(rs);
  absl::Status s = executor.Start(job);
  if (s.ok()) s = executor.Wait(job);
  EXPECT_TRUE(s.ok()) << s;
  std::vector<float> out;
  for (const auto& r : job.requests) {
    const auto* o = static_cast<const float*>(r->output.data());
    out.insert(out.end(), o, o + r->tensor_bytes / sizeof(float));
  }
  return out;
}

TEST(InputFill, CpuExecutorWaitsForRowsStillBeingCopied) {
  ExecutorOptions options;
  options.cpu_threads = 2;
  options.host_pool_bytes = size_t{64} << 20;
  absl::StatusOr<std::unique_ptr<Executor>> cpu = CreateCpuExecutor(options);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  absl::BitGen gen;
  constexpr int64_t kHeads = 2, kDim = 16;
  // One request alone (run on its own memory), then two packed into one problem, the second
  // still being copied.
  for (int requests : {1, 2}) {
    std::vector<int64_t> tokens;
    std::vector<std::vector<std::string>> src;
    for (int i = 0; i < requests; ++i) {
      tokens.push_back(absl::Uniform<int64_t>(gen, 100, 700));
      std::vector<std::string> t(3, std::string(tokens.back() * kHeads * kDim * 4, '\0'));
      for (std::string& x : t) {
        for (size_t at = 0; at < x.size(); at += 4) {
          const float f = absl::Uniform<float>(gen, -1.f, 1.f);
          std::memcpy(x.data() + at, &f, 4);
        }
      }
      src.push_back(std::move(t));
    }
    std::vector<std::vector<std::string>> in_place(requests, std::vector<std::string>(3));
    std::vector<std::vector<std::string>> filled;
    for (int i = 0; i < requests; ++i) {
      filled.emplace_back(3, std::string(src[static_cast<size_t>(i)][0].size(), '\0'));
    }
    std::vector<std::unique_ptr<InferenceRequest>> expected_job, filled_job;
    for (size_t i = 0; i < tokens.size(); ++i) {
      expected_job.push_back(
          AttentionRequest(tokens[i], kHeads, kDim, src[i], &in_place[i], false));
      filled_job.push_back(
          AttentionRequest(tokens[i], kHeads, kDim, src[i], &filled[i], i + 1 == tokens.size()));
    }
    const std::vector<float> expected = RunJob(**cpu, std::move(expected_job));
    const std::vector<float> got = RunJob(**cpu, std::move(filled_job));
    ASSERT_EQ(got.size(), expected.size());
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_FALSE(std::isnan(got[i])) << "output " << i << " with " << requests << " request(s)";
      ASSERT_EQ(got[i], expected[i]) << "output " << i << " with " << requests << " request(s)";
    }
  }
}

}  // namespace
}  // namespace dilattn::server
