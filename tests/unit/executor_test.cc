// When the GPU executor may run a job in place on the client's CUDA shared memory: checked on
// pointers alone (nothing is dereferenced), so it runs without a GPU.

#include <cstddef>
#include <memory>

#include "gtest/gtest.h"
#include "server/engine.h"
#include "server/executor.h"

namespace dilattn::server {
namespace {

constexpr size_t kBytes = 4096;  // one tensor

// A job of one request with Q, K, V and O at the given byte offsets of one "device" range.
class InPlace : public ::testing::Test {
 protected:
  alignas(64) std::byte region_[8 * kBytes];

  std::unique_ptr<Job> MakeJob(size_t q, size_t k, size_t v, size_t o, int device = 0) {
    auto job = std::make_unique<Job>();
    auto r = std::make_unique<InferenceRequest>();
    r->tensor_bytes = kBytes;
    const char* base = reinterpret_cast<const char*>(region_);
    r->q = absl::string_view(base + q, kBytes);
    r->k = absl::string_view(base + k, kBytes);
    r->v = absl::string_view(base + v, kBytes);
    for (int& d : r->input_device) d = device;
    r->output_target = {region_ + o, device};
    job->requests.push_back(std::move(r));
    return job;
  }
};

TEST_F(InPlace, LoneAlignedRequestOnTheDevice) {
  EXPECT_TRUE(RunsInPlace(*MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes), false, 0));
  // O right after V touches it without overlapping; inputs may share a range (K = V).
  EXPECT_TRUE(RunsInPlace(*MakeJob(0, kBytes, kBytes, 2 * kBytes), false, 0));
  EXPECT_TRUE(RunsInPlace(*MakeJob(kBytes, kBytes, kBytes, 5 * kBytes, 3), false, 3));
}

TEST_F(InPlace, CopiesOtherwise) {
  // FP32 requests convert through the executor's own buffers.
  EXPECT_FALSE(RunsInPlace(*MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes), true, 0));
  // Another device than the executor's.
  EXPECT_FALSE(RunsInPlace(*MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes, 1), false, 0));
  // O over an input, or overlapping one by a byte.
  EXPECT_FALSE(RunsInPlace(*MakeJob(0, kBytes, 2 * kBytes, 0), false, 0));
  EXPECT_FALSE(RunsInPlace(*MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes - 16), false, 0));
  // Not 16-byte aligned: O, or an input.
  EXPECT_FALSE(RunsInPlace(*MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes + 2), false, 0));
  EXPECT_FALSE(RunsInPlace(*MakeJob(8, 2 * kBytes, 3 * kBytes, 4 * kBytes), false, 0));

  auto one_input_on_host = MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes);
  one_input_on_host->requests[0]->input_device[1] = -1;
  EXPECT_FALSE(RunsInPlace(*one_input_on_host, false, 0));

  auto output_in_a_lease = MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes);
  output_in_a_lease->requests[0]->output_target = {};
  EXPECT_FALSE(RunsInPlace(*output_in_a_lease, false, 0));

  auto short_input = MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes);
  short_input->requests[0]->v = short_input->requests[0]->v.substr(0, kBytes / 2);
  EXPECT_FALSE(RunsInPlace(*short_input, false, 0));

  // Two requests: their tensors are packed into one problem, so they are copied.
  auto two = MakeJob(0, kBytes, 2 * kBytes, 3 * kBytes);
  auto other = MakeJob(4 * kBytes, 5 * kBytes, 6 * kBytes, 7 * kBytes);
  two->requests.push_back(std::move(other->requests[0]));
  EXPECT_FALSE(RunsInPlace(*two, false, 0));
}

TEST_F(InPlace, OnTheHostNeedsWholeElementsAndNoOverlap) {
  // Host tensors in a system shared-memory region: the CPU path runs on them where it can.
  auto host = [&](size_t q, size_t k, size_t v, size_t o, attention::DType dtype) {
    auto job = MakeJob(q, k, v, o, -1);
    job->requests[0]->dtype = dtype;
    return job;
  };
  using attention::DType;
  EXPECT_TRUE(RunsInPlaceOnHost(*host(0, kBytes, kBytes, 2 * kBytes, DType::kFloat32)));
  EXPECT_TRUE(RunsInPlaceOnHost(*host(4, kBytes + 4, 2 * kBytes + 4, 3 * kBytes + 4,
                                      DType::kFloat32)));
  EXPECT_TRUE(RunsInPlaceOnHost(*host(2, kBytes + 2, 2 * kBytes + 2, 3 * kBytes + 2,
                                      DType::kBFloat16)));
  EXPECT_FALSE(RunsInPlaceOnHost(*host(2, kBytes, 2 * kBytes, 3 * kBytes, DType::kFloat32)));
  EXPECT_FALSE(RunsInPlaceOnHost(*host(0, kBytes, 2 * kBytes, 3 * kBytes + 1, DType::kFloat16)));
  EXPECT_FALSE(RunsInPlaceOnHost(*host(0, kBytes, 2 * kBytes, 2 * kBytes - 4, DType::kFloat32)));
  // No output range given: the output is leased.
  auto leased = host(0, kBytes, 2 * kBytes, 0, DType::kFloat32);
  leased->requests[0]->output_target = {};
  EXPECT_TRUE(RunsInPlaceOnHost(*leased));
  auto two = host(0, kBytes, 2 * kBytes, 3 * kBytes, DType::kFloat32);
  two->requests.push_back(std::move(host(0, kBytes, 2 * kBytes, 3 * kBytes,
                                         DType::kFloat32)->requests[0]));
  EXPECT_FALSE(RunsInPlaceOnHost(*two));
}

// --device names: a bad or repeated GPU number, or an unknown word, is refused by name before
// any device is touched; "cpu" gives one engine thread on the CPU executor.
TEST(EngineDevices, BadNamesAreRefusedAndCpuRunsOneThread) {
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:0,0", "cuda:a", "cuda:0,,1"}) {
    EngineOptions o;
    o.device = bad;
    o.executor.host_pool_bytes = size_t{1} << 20;
    absl::StatusOr<std::unique_ptr<Engine>> e = Engine::Create(o);
    ASSERT_FALSE(e.ok()) << bad;
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(e.status().message().find("--device"), absl::string_view::npos) << e.status();
  }
  EngineOptions o;
  o.device = "cpu";
  o.executor.host_pool_bytes = size_t{1} << 20;
  absl::StatusOr<std::unique_ptr<Engine>> e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->num_workers(), 1);
  EXPECT_EQ((*e)->cuda_device(), -1);
  EXPECT_NE((*e)->backend_name().find("cpu"), std::string::npos);
  EXPECT_EQ((*e)->pools().size(), 1u);
  (*e)->Shutdown();
}

// --cpu-engines: engine threads on the CPU, each with its share of the backend threads, over one
// host pool; each reports its time as cpu:N. None is refused by name.
TEST(EngineDevices, CpuEnginesShareTheThreadsAndOnePool) {
  EngineOptions o;
  o.device = "cpu";
  o.cpu_engines = 3;
  o.executor.cpu_threads = 4;
  o.executor.host_pool_bytes = size_t{1} << 20;
  absl::StatusOr<std::unique_ptr<Engine>> e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->num_workers(), 3);
  EXPECT_EQ((*e)->pools().size(), 1u);
  EXPECT_EQ((*e)->backend_name().rfind("3 x cpu", 0), 0u) << (*e)->backend_name();
  std::vector<std::string> labels;
  for (const EngineThreadTimes& t : (*e)->ThreadTimes()) labels.push_back(t.device);
  EXPECT_EQ(labels, (std::vector<std::string>{"cpu:0", "cpu:1", "cpu:2"}));
  (*e)->Shutdown();

  o.cpu_engines = 0;
  e = Engine::Create(o);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("--cpu-engines"), absl::string_view::npos) << e.status();
}

}  // namespace
}  // namespace dilattn::server
