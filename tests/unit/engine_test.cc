// The engine's threads, one per device, with executors that only record what they ran: every
// submitted batch runs once and completes, batches spread over the devices, a batch whose
// tensors lie on a GPU runs on that GPU's thread, and one on a GPU no thread runs goes to any.
// Runs without a GPU, and in CI under ASan/UBSan and under ThreadSanitizer.

#include "server/engine.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "kernels/block_sparse/block_sparse.h"
#include "kernels/common/clock.h"
#include "kernels/memory/allocator.h"
#include "server/executor.h"
#include "server/metrics.h"
#include "server/model.h"
#include "tests/unit/wall_clock_shift.h"

namespace dilattn::server {
namespace {

// Which device ran each request (by its `batch` field, used here as an id).
struct RunLog {
  absl::Mutex mu;
  std::map<int64_t, int> device_of ABSL_GUARDED_BY(mu);
  std::map<int64_t, int> runs ABSL_GUARDED_BY(mu);
  std::atomic<int> active{0};    // jobs started and not yet waited for, on every executor
  std::atomic<int> released{0};  // ReleaseCachedMemory calls
  std::atomic<int> jobs{0};
  std::atomic<int> widest{0};  // the most requests one job held
  std::atomic<int64_t> max_kept_pairs{0};  // the most block pairs one job held
};

// Faults a RecordingExecutor's device shows, by its jobs' numbers (from 1; 0: none).
struct DeviceFaults {
  int lost_at = 0;       // that job's Wait fails and the device is lost, as a GPU's sticky error
  int transient_at = 0;  // that job's Wait fails and the device still works
};

class RecordingExecutor final : public Executor {
 public:
  RecordingExecutor(int device, RunLog* log, memory::BufferPool* pool, DeviceFaults faults = {})
      : device_(device), log_(log), pool_(pool), faults_(faults) {}
  std::string name() const override { return "recording"; }
  int cuda_device() const override { return device_; }
  absl::StatusOr<PlanFacts> Supports(const InferenceRequest&) const override { return PlanFacts{}; }
  std::vector<const memory::BufferPool*> pools() const override { return {pool_}; }
  memory::BufferPool& staging_pool() override { return *pool_; }
  absl::Status Start(Job& job) override {
    // Every call on a lost device fails, as on a GPU whose context a sticky error corrupted.
    if (lost_) return absl::InternalError("cudaErrorIllegalAddress (an illegal memory access)");
    started_.push_back(++jobs_);
    WaitForInputs(job);  // as every executor does before it reads them
    {
      absl::MutexLock lock(&log_->mu);
      for (const auto& r : job.requests) {
        log_->device_of[r->batch] = device_;
        ++log_->runs[r->batch];
      }
    }
    log_->active.fetch_add(1);
    log_->jobs.fetch_add(1);
    int widest = log_->widest.load();
    const int n = static_cast<int>(job.requests.size());
    while (n > widest && !log_->widest.compare_exchange_weak(widest, n)) {
    }
    int64_t pairs = 0;
    for (const auto& r : job.requests) pairs += r->kept_pairs;
    int64_t most = log_->max_kept_pairs.load();
    while (pairs > most && !log_->max_kept_pairs.compare_exchange_weak(most, pairs)) {
    }
    absl::SleepFor(absl::Milliseconds(1));  // long enough for the other threads to take work
    return absl::OkStatus();
  }
  absl::Status Wait(Job&) override {
    absl::SleepFor(absl::Microseconds(500));
    log_->active.fetch_sub(1);
    const int job = started_.front();
    started_.pop_front();
    if (job == faults_.lost_at) lost_ = true;
    if (lost_ || job == faults_.transient_at) {
      return absl::InternalError("cudaErrorIllegalAddress (an illegal memory access)");
    }
    return absl::OkStatus();
  }
  absl::Status CheckDevice() override {
    return lost_ ? absl::InternalError("cudaErrorIllegalAddress (an illegal memory access)")
                 : absl::OkStatus();
  }
  void ReleaseCachedMemory() override { log_->released.fetch_add(1); }

 private:
  const int device_;
  RunLog* const log_;
  memory::BufferPool* const pool_;
  const DeviceFaults faults_;
  int jobs_ = 0;
  std::deque<int> started_;  // numbers of the jobs started and not yet waited for
  bool lost_ = false;
};

// A GPU-like executor (Start issues, Wait finishes) whose jobs each hold most of the pool from
// Start until they are destroyed, as device tensors do.
class PoolHoldingExecutor final : public Executor {
 public:
  explicit PoolHoldingExecutor(memory::BufferPool* pool) : pool_(pool) {}
  std::string name() const override { return "pool-holding"; }
  int cuda_device() const override { return 0; }
  absl::StatusOr<PlanFacts> Supports(const InferenceRequest&) const override { return PlanFacts{}; }
  std::vector<const memory::BufferPool*> pools() const override { return {pool_}; }
  memory::BufferPool& staging_pool() override { return *pool_; }
  absl::Status Start(Job& job) override {
    absl::StatusOr<memory::Buffer> b =
        pool_->Acquire(size_t{600} << 10, job.pool_deadline(absl::Seconds(10)));  // of 1 MiB
    if (!b.ok()) return b.status();
    job.leases.push_back(*std::move(b));
    return absl::OkStatus();
  }
  absl::Status Wait(Job&) override { return absl::OkStatus(); }

 private:
  memory::BufferPool* const pool_;
};

// Each ReleaseIdleMemory call an executor got, and those made while a job of its was in flight.
struct IdleLog {
  struct Call {
    absl::Time at;
    absl::Time cutoff;
  };
  absl::Mutex mu;
  std::vector<Call> calls ABSL_GUARDED_BY(mu);
  std::atomic<int> in_flight{0};  // jobs between Start and the end of their Wait
  std::atomic<int> during_job{0};
  std::atomic<size_t> freed_per_release{0};  // what each ReleaseIdleMemory reports
  // The engine's heap trims, and those made while a job was in flight.
  std::atomic<int> trims{0};
  std::atomic<int> trims_during_job{0};

  std::function<void()> Trim() {
    return [this] {
      if (in_flight.load() != 0) trims_during_job.fetch_add(1);
      trims.fetch_add(1);
    };
  }

  std::vector<Call> Calls() {
    absl::MutexLock lock(&mu);
    return calls;
  }
};

// A GPU-like executor whose jobs stay in flight from Start until Wait returns, `job_time` later,
// recording its ReleaseIdleMemory calls. Start takes a little while too, so that the next
// request is queued by then and the engine starts it before waiting for the previous one.
class IdleRecordingExecutor final : public Executor {
 public:
  IdleRecordingExecutor(IdleLog* log, memory::BufferPool* pool, absl::Duration job_time,
                        int device = 0)
      : log_(log), pool_(pool), job_time_(job_time), device_(device) {}
  std::string name() const override { return "idle-recording"; }
  int cuda_device() const override { return device_; }
  absl::StatusOr<PlanFacts> Supports(const InferenceRequest&) const override { return PlanFacts{}; }
  std::vector<const memory::BufferPool*> pools() const override { return {pool_}; }
  memory::BufferPool& staging_pool() override { return *pool_; }
  absl::Status Start(Job&) override {
    log_->in_flight.fetch_add(1);
    absl::SleepFor(absl::Milliseconds(20));
    return absl::OkStatus();
  }
  absl::Status Wait(Job&) override {
    absl::SleepFor(job_time_);
    log_->in_flight.fetch_sub(1);
    return absl::OkStatus();
  }
  size_t ReleaseIdleMemory(absl::Time cutoff) override {
    if (log_->in_flight.load() != 0) log_->during_job.fetch_add(1);
    absl::MutexLock lock(&log_->mu);
    log_->calls.push_back({MonotonicNow(), cutoff});
    return log_->freed_per_release.load();
  }

 private:
  IdleLog* const log_;
  memory::BufferPool* const pool_;
  const absl::Duration job_time_;
  const int device_;
};

// A CPU-like executor (it computes in Start) whose jobs take a while; counts the requests it ran.
class SlowExecutor final : public Executor {
 public:
  SlowExecutor(memory::BufferPool* pool, std::atomic<int>* ran) : pool_(pool), ran_(ran) {}
  std::string name() const override { return "slow"; }
  int cuda_device() const override { return -1; }
  absl::StatusOr<PlanFacts> Supports(const InferenceRequest&) const override { return PlanFacts{}; }
  std::vector<const memory::BufferPool*> pools() const override { return {pool_}; }
  memory::BufferPool& staging_pool() override { return *pool_; }
  absl::Status Start(Job& job) override {
    absl::SleepFor(absl::Milliseconds(300));
    ran_->fetch_add(static_cast<int>(job.requests.size()));
    return absl::OkStatus();
  }
  absl::Status Wait(Job&) override { return absl::OkStatus(); }

 private:
  memory::BufferPool* const pool_;
  std::atomic<int>* const ran_;
};

// A GPU whose first job hangs: its Wait takes `hang`, and the next job's Start, which the engine
// issues before that Wait, takes as long too, as a CUDA call that waits for the device would.
// `in_second_start` is set while that Start runs.
class HangingExecutor final : public Executor {
 public:
  HangingExecutor(memory::BufferPool* pool, absl::Duration hang) : pool_(pool), hang_(hang) {}
  std::string name() const override { return "hanging"; }
  int cuda_device() const override { return 0; }
  absl::StatusOr<PlanFacts> Supports(const InferenceRequest&) const override { return PlanFacts{}; }
  std::vector<const memory::BufferPool*> pools() const override { return {pool_}; }
  memory::BufferPool& staging_pool() override { return *pool_; }
  absl::Status Start(Job&) override {
    // Long enough for the second request to be queued, so that it starts before the first is
    // waited for.
    if (starts_ == 0) absl::SleepFor(absl::Milliseconds(50));
    if (++starts_ == 2) {
      in_second_start.store(true);
      absl::SleepFor(hang_);
      in_second_start.store(false);
    }
    return absl::OkStatus();
  }
  absl::Status Wait(Job&) override {
    if (++waits_ == 1) absl::SleepFor(hang_);
    return absl::OkStatus();
  }
  std::atomic<bool> in_second_start{false};

 private:
  memory::BufferPool* const pool_;
  const absl::Duration hang_;
  int starts_ = 0, waits_ = 0;
};

// Takes requests of at least 100 tokens; checks, while it runs one, that no executor runs a job.
// Has a pool of its own, as the sequence-parallel runner has one per GPU. Each run takes
// `run_time`.
class RecordingGang final : public GangRunner {
 public:
  explicit RecordingGang(RunLog* log, absl::Duration run_time = absl::Milliseconds(2))
      : log_(log),
        run_time_(run_time),
        pool_(*memory::BufferPool::Create({"gang", size_t{1} << 20}, memory::NewHostAllocator())) {}
  bool Takes(const InferenceRequest& r) const override { return r.seq_len >= 100; }
  absl::Status Run(Job& job) override {
    if (log_->active.load() != 0) overlapped_.fetch_add(1);
    absl::SleepFor(run_time_);
    if (log_->active.load() != 0) overlapped_.fetch_add(1);
    absl::MutexLock lock(&log_->mu);
    for (const auto& r : job.requests) {
      log_->device_of[r->batch] = -2;
      ++log_->runs[r->batch];
    }
    return absl::OkStatus();
  }
  void ReleaseCachedMemory() override {}
  std::vector<const memory::BufferPool*> pools() const override { return {pool_.get()}; }
  int overlapped() const { return overlapped_.load(); }

 private:
  RunLog* const log_;
  const absl::Duration run_time_;
  const std::unique_ptr<memory::BufferPool> pool_;
  std::atomic<int> overlapped_{0};
};

class EngineThreads : public ::testing::Test {
 protected:
  void SetUp() override {
    auto pool = memory::BufferPool::Create({"host", size_t{1} << 20},
                                           memory::NewStagingHostAllocator());
    ASSERT_TRUE(pool.ok());
    pool_ = *std::move(pool);
    auto metrics = Metrics::Create("");
    ASSERT_TRUE(metrics.ok());
    metrics_ = *std::move(metrics);
  }

  static absl::StatusOr<ModelSpec> Spec(absl::string_view name, absl::string_view batching) {
    return ParseModelConfig(absl::StrCat("name: \"", name, R"pb("
                                                                parameters {
                                                                  key: "segment_lengths"
                                                                  value { string_value: "16" }
                                                                }
                                                                parameters {
                                                                  key: "dilation_rates"
                                                                  value { string_value: "1" }
                                                                })pb",
                                         batching),
                            "test", "");
  }

  // A request of one sequence for `model`'s batcher, counted in ok_ / failed_ when it completes.
  std::unique_ptr<InferenceRequest> Request(Model* model) {
    auto r = std::make_unique<InferenceRequest>();
    r->model = model;
    r->batch = 1;
    r->seq_len = 1;
    r->done = [this](InferenceRequest&, const absl::Status& s, const RequestTimings&) {
      (s.ok() ? ok_ : failed_).fetch_add(1);
    };
    return r;
  }

  void Start(std::vector<int> devices, bool gang = false, absl::string_view batching = "",
             const std::map<int, DeviceFaults>& faults = {}) {
    std::vector<std::unique_ptr<Executor>> executors = Recorders(devices, faults);
    std::unique_ptr<GangRunner> runner;
    if (gang) {
      auto g = std::make_unique<RecordingGang>(&log_);
      gang_ = g.get();
      runner = std::move(g);
    }
    auto engine = Engine::CreateWith(std::move(executors), std::move(runner));
    ASSERT_TRUE(engine.ok());
    engine_ = *std::move(engine);
    // The model's name comes from a config (GCC 12 warns falsely, -Wrestrict, on assigning a
    // literal to the spec's name here).
    absl::StatusOr<ModelSpec> spec = Spec("m", batching);
    ASSERT_TRUE(spec.ok()) << spec.status();
    model_ = std::make_unique<Model>(*std::move(spec), engine_.get(), metrics_.get());
  }

  // An engine over `executor` alone that releases pool memory idle for `idle_release`.
  void StartWith(std::unique_ptr<Executor> executor, absl::Duration idle_release,
                 std::function<void()> trim_heap = nullptr) {
    std::vector<std::unique_ptr<Executor>> executors;
    executors.push_back(std::move(executor));
    StartWithAll(std::move(executors), idle_release, std::move(trim_heap));
  }

  void StartWithAll(std::vector<std::unique_ptr<Executor>> executors, absl::Duration idle_release,
                    std::function<void()> trim_heap = nullptr,
                    absl::Duration gpu_job_timeout = absl::ZeroDuration(),
                    std::unique_ptr<GangRunner> gang = nullptr) {
    auto engine = Engine::CreateWith(std::move(executors), std::move(gang), idle_release,
                                     std::move(trim_heap), gpu_job_timeout);
    ASSERT_TRUE(engine.ok());
    engine_ = *std::move(engine);
    absl::StatusOr<ModelSpec> spec = Spec("m", "");
    ASSERT_TRUE(spec.ok()) << spec.status();
    model_ = std::make_unique<Model>(*std::move(spec), engine_.get(), metrics_.get());
  }

  // A RecordingExecutor for each of `devices`, with its faults.
  std::vector<std::unique_ptr<Executor>> Recorders(const std::vector<int>& devices,
                                                   const std::map<int, DeviceFaults>& faults = {}) {
    std::vector<std::unique_ptr<Executor>> executors;
    for (int d : devices) {
      const auto f = faults.find(d);
      executors.push_back(std::make_unique<RecordingExecutor>(
          d, &log_, pool_.get(), f == faults.end() ? DeviceFaults{} : f->second));
    }
    return executors;
  }

  // One GPU-like executor whose jobs take `job_time` on the device.
  std::vector<std::unique_ptr<Executor>> TimedJobs(IdleLog* log, absl::Duration job_time) {
    std::vector<std::unique_ptr<Executor>> executors;
    executors.push_back(std::make_unique<IdleRecordingExecutor>(log, pool_.get(), job_time));
    return executors;
  }

  bool WaitFor(const std::function<bool()>& done, absl::Duration timeout = absl::Seconds(10)) {
    const absl::Time give_up = MonotonicNow() + timeout;
    while (!done() && MonotonicNow() < give_up) absl::SleepFor(absl::Milliseconds(1));
    return done();
  }

  // Submits request `id` alone in a batch, with its tensors on `device` (-1: host), and with
  // `fill` as its inputs' copy still running when given.
  void Submit(int64_t id, int device, int64_t tokens = 1,
              std::unique_ptr<InputFill> fill = nullptr) {
    auto r = std::make_unique<InferenceRequest>();
    r->model = model_.get();
    r->batch = id;
    r->seq_len = tokens;
    r->fill = std::move(fill);
    for (int& d : r->input_device) d = device;
    r->done = [this](InferenceRequest& done, const absl::Status& s, const RequestTimings&) {
      (s.ok() ? ok_ : failed_).fetch_add(1);
      absl::MutexLock lock(&status_mu_);
      status_of_[done.batch] = s;
    };
    SubmitAlone(std::move(r));
  }

  // Hands `r` to the engine alone in a batch, in a slot of its own.
  void SubmitAlone(std::unique_ptr<InferenceRequest> r) {
    ASSERT_TRUE(engine_->AcquireSlot(absl::InfiniteFuture()));
    Batch batch;
    batch.model = model_.get();
    batch.requests.push_back(std::move(r));
    engine_->Submit(std::move(batch));
  }

  void TearDown() override {
    if (engine_ != nullptr) engine_->Shutdown();
    model_.reset();
  }

  RunLog log_;
  std::unique_ptr<memory::BufferPool> pool_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Model> model_;
  RecordingGang* gang_ = nullptr;
  std::atomic<int> ok_{0}, failed_{0};
  absl::Mutex status_mu_;
  std::map<int64_t, absl::Status> status_of_ ABSL_GUARDED_BY(status_mu_);  // Submit's, by id
};

TEST_F(EngineThreads, EveryBatchRunsOnceAndTheyShareTheDevices) {
  Start({0, 1});
  EXPECT_EQ(engine_->num_workers(), 2);
  EXPECT_EQ(engine_->pools().size(), 1u);  // one shared pool, counted once
  for (int64_t id = 1; id <= 60; ++id) Submit(id, -1);
  engine_->Shutdown();  // runs every submitted batch first
  EXPECT_EQ(ok_.load(), 60);
  EXPECT_EQ(failed_.load(), 0);
  absl::MutexLock lock(&log_.mu);
  ASSERT_EQ(log_.runs.size(), 60u);
  std::map<int, int> per_device;
  for (const auto& [id, n] : log_.runs) {
    EXPECT_EQ(n, 1) << "request " << id;
    ++per_device[log_.device_of[id]];
  }
  EXPECT_GT(per_device[0], 0);
  EXPECT_GT(per_device[1], 0);
}

TEST_F(EngineThreads, BatchesRunOnTheGpuHoldingTheirTensors) {
  Start({0, 1, 2});
  for (int64_t id = 1; id <= 90; ++id) Submit(id, id % 3 == 0 ? 2 : id % 3 == 1 ? -1 : 7);
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 90);
  absl::MutexLock lock(&log_.mu);
  ASSERT_EQ(log_.runs.size(), 90u);
  std::map<int, int> anywhere;
  for (int64_t id = 1; id <= 90; ++id) {
    if (id % 3 == 0) {
      EXPECT_EQ(log_.device_of[id], 2) << "request " << id << " left the GPU holding it";
    } else {
      ++anywhere[log_.device_of[id]];  // host tensors, or a GPU no thread runs (7)
    }
  }
  EXPECT_GE(anywhere.size(), 2u);
}

// A batch whose inputs are still being copied out of their message holds the executor's Start()
// until they are; the job before it completes first instead of waiting behind that copy.
TEST_F(EngineThreads, ABatchStillBeingCopiedDoesNotHoldUpThePreviousOne) {
  Start({0});
  absl::Notification copy_may_end;
  char byte = 0;
  Submit(1, -1);
  Submit(2, -1, 1,
         InputFill::Start(
             1, 1, {&byte},
             [&copy_may_end](int, size_t, size_t, void* dst) {
               copy_may_end.WaitForNotification();
               *static_cast<char*>(dst) = 1;
             },
             1));
  const absl::Time give_up = MonotonicNow() + absl::Seconds(10);
  while (ok_.load() < 1 && MonotonicNow() < give_up) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(ok_.load(), 1) << "the first request waited for the second's copy";
  copy_may_end.Notify();
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 2);
  EXPECT_EQ(byte, 1);
}

// The gang runner's own pools are listed with the executors' shared one: the server exports the
// pools listed here (the sequence-parallel runner's were missing from the metrics).
TEST_F(EngineThreads, PoolsIncludeTheGangRunners) {
  Start({0, 1}, /*gang=*/true);
  const std::vector<const memory::BufferPool*> pools = engine_->pools();
  ASSERT_EQ(pools.size(), 2u);
  EXPECT_EQ(pools[0], pool_.get());
  EXPECT_EQ(pools[1]->name(), "gang");
}

// Long sequences run across every device (the gang runner) while no executor runs a job, each
// once, between ordinary batches that keep running on the executors before and after.
TEST_F(EngineThreads, GangBatchesRunAloneOnEveryDevice) {
  Start({0, 1, 2}, /*gang=*/true);
  for (int64_t id = 1; id <= 120; ++id) Submit(id, -1, id % 10 == 0 ? 500 : 1);
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 120);
  EXPECT_EQ(failed_.load(), 0);
  EXPECT_EQ(gang_->overlapped(), 0) << "a gang run overlapped an executor's job";
  EXPECT_GE(log_.released.load(), 3 * 12);  // every executor's cache, before each gang run
  absl::MutexLock lock(&log_.mu);
  ASSERT_EQ(log_.runs.size(), 120u);
  for (int64_t id = 1; id <= 120; ++id) {
    EXPECT_EQ(log_.runs[id], 1) << "request " << id;
    EXPECT_EQ(log_.device_of[id] == -2, id % 10 == 0) << "request " << id;
  }
}

// A device whose job leaves it unusable (a sticky CUDA error, which CUDA reports for every device
// of the process from then on) stops every GPU: each later batch, a long sequence's for the gang
// included, is answered UNAVAILABLE at once, naming the error, and none is run or lost; the
// handler hears of it once, and the thread times name the device.
TEST_F(EngineThreads, ALostDeviceStopsEveryGpuAndEachRequestIsAnsweredUnavailable) {
  Start({0, 1}, /*gang=*/true, "", {{1, DeviceFaults{.lost_at = 1}}});
  absl::Mutex mu;
  std::vector<std::string> reported;
  engine_->SetDeviceLostHandler([&](const absl::Status& error) {
    absl::MutexLock lock(&mu);
    reported.push_back(std::string(error.message()));
  });
  EXPECT_TRUE(engine_->DeviceLost().ok());
  EXPECT_TRUE(engine_->Available().ok());
  Submit(1, 1);  // its tensors on GPU 1, whose thread takes it and fails
  ASSERT_TRUE(WaitFor([&] { return !engine_->DeviceLost().ok(); }));
  for (int64_t id = 2; id <= 31; ++id) Submit(id, id % 3 - 1, id % 5 == 0 ? 500 : 1);
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 0);
  EXPECT_EQ(failed_.load(), 31);
  {
    absl::MutexLock lock(&status_mu_);
    ASSERT_EQ(status_of_.size(), 31u);
    EXPECT_TRUE(absl::IsInternal(status_of_[1])) << status_of_[1];
    for (int64_t id = 2; id <= 31; ++id) {
      const absl::Status& s = status_of_[id];
      EXPECT_TRUE(absl::IsUnavailable(s)) << "request " << id << ": " << s;
      EXPECT_TRUE(absl::StrContains(
          s.message(), "this server's GPUs stopped after a device error (cuda:1: cudaError"))
          << s;
      EXPECT_TRUE(absl::EndsWith(s.message(), "retry on another replica")) << s;
    }
  }
  {
    absl::MutexLock lock(&log_.mu);
    EXPECT_EQ(log_.runs.size(), 1u);  // only the request that lost the device ever started
  }
  const absl::Status lost = engine_->DeviceLost();
  EXPECT_TRUE(absl::StartsWith(lost.message(), "cuda:1: cudaErrorIllegalAddress")) << lost;
  // What the handlers answer before leasing anything: the refusals' status.
  {
    absl::MutexLock lock(&status_mu_);
    EXPECT_EQ(engine_->Available(), status_of_[2]);
  }
  {
    absl::MutexLock lock(&mu);
    ASSERT_EQ(reported.size(), 1u);
    EXPECT_EQ(reported[0], lost.message());
  }
  const std::vector<EngineThreadTimes> times = engine_->ThreadTimes();
  ASSERT_EQ(times.size(), 2u);
  EXPECT_FALSE(times[0].failed);
  EXPECT_TRUE(times[1].failed);
}

// An error after which the device still works (a refused launch, say) fails its job alone.
TEST_F(EngineThreads, AnErrorThatLeavesTheDeviceWorkingKeepsItInService) {
  Start({0}, false, "", {{0, DeviceFaults{.transient_at = 1}}});
  Submit(1, -1);
  ASSERT_TRUE(WaitFor([&] { return failed_.load() == 1; }));
  for (int64_t id = 2; id <= 11; ++id) Submit(id, -1);
  engine_->Shutdown();
  EXPECT_EQ(failed_.load(), 1);
  EXPECT_EQ(ok_.load(), 10);
  EXPECT_TRUE(engine_->DeviceLost().ok());
  EXPECT_FALSE(engine_->ThreadTimes()[0].failed);
}

// A GPU job the device has not finished after gpu_job_timeout is taken for a hung device: the
// GPUs stop (later requests UNAVAILABLE at once) while that job is still waited for; it still
// completes when the device does. Jobs within the timeout never trip it.
TEST_F(EngineThreads, AJobPastTheTimeoutStopsTheGpus) {
  IdleLog idle;
  StartWithAll(TimedJobs(&idle, absl::Milliseconds(1500)), absl::ZeroDuration(), nullptr,
               absl::Milliseconds(300));
  Submit(1, -1);
  ASSERT_TRUE(WaitFor([&] { return !engine_->DeviceLost().ok(); }, absl::Seconds(5)));
  EXPECT_EQ(idle.in_flight.load(), 1) << "stopped only once the job had finished";
  const absl::Status lost = engine_->DeviceLost();
  EXPECT_TRUE(absl::IsDeadlineExceeded(lost)) << lost;
  EXPECT_TRUE(absl::StrContains(lost.message(), "cuda:0: a GPU job has not finished in")) << lost;
  EXPECT_TRUE(absl::StrContains(lost.message(), "the device is taken as hung")) << lost;
  EXPECT_EQ(engine_->HungRequests(), 1);
  const std::string work = engine_->GpuWork();
  EXPECT_TRUE(absl::StrContains(work, "cuda:0: a job running for ")) << work;
  EXPECT_TRUE(absl::EndsWith(work, ", 1 request(s)")) << work;
  Submit(2, -1);  // refused: held by no job
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 1; }));
  EXPECT_EQ(engine_->HungRequests(), 0) << "the device finished the job after all";
  EXPECT_EQ(engine_->GpuWork(), "");
  engine_->Shutdown();
  absl::MutexLock lock(&status_mu_);
  EXPECT_TRUE(status_of_[1].ok()) << status_of_[1];
  EXPECT_TRUE(absl::IsUnavailable(status_of_[2])) << status_of_[2];
  EXPECT_TRUE(engine_->ThreadTimes()[0].failed);
}

// A hung device holds its engine thread, on a one-GPU server the only one: the batch queued when
// the GPUs stop and each one after are refused at once all the same, not when (if ever) the
// device lets the thread go.
TEST_F(EngineThreads, RequestsAreRefusedWhileTheHungDeviceHoldsItsThread) {
  IdleLog idle;
  StartWithAll(TimedJobs(&idle, absl::Milliseconds(1500)), absl::ZeroDuration(), nullptr,
               absl::Milliseconds(300));
  for (int64_t id = 1; id <= 3; ++id) Submit(id, -1);  // 1 in flight, 2 started, 3 queued
  ASSERT_TRUE(WaitFor([&] { return !engine_->DeviceLost().ok(); }, absl::Seconds(5)));
  Submit(4, -1);
  ASSERT_TRUE(WaitFor([&] { return failed_.load() == 2; }, absl::Milliseconds(500)));
  EXPECT_EQ(ok_.load(), 0) << "refused only once the thread was free";
  EXPECT_EQ(engine_->HungRequests(), 2);
  {
    absl::MutexLock lock(&status_mu_);
    EXPECT_TRUE(absl::IsUnavailable(status_of_[3])) << status_of_[3];
    EXPECT_TRUE(absl::IsUnavailable(status_of_[4])) << status_of_[4];
  }
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 2);  // the device finished them after all
}

// A sequence-parallel run that does not finish is found as a job is: the GPUs stop, later
// requests (another one for the gang among them) are refused at once, and the run's request is
// held by the hung devices until it ends.
TEST_F(EngineThreads, AHungSequenceParallelRunStopsTheGpus) {
  StartWithAll(Recorders({0, 1}), absl::ZeroDuration(), nullptr, absl::Milliseconds(300),
               std::make_unique<RecordingGang>(&log_, absl::Milliseconds(1500)));
  Submit(1, -1, 500);  // long enough for the gang
  ASSERT_TRUE(WaitFor([&] { return !engine_->DeviceLost().ok(); }, absl::Seconds(5)));
  const absl::Status lost = engine_->DeviceLost();
  EXPECT_TRUE(absl::StrContains(lost.message(), "a GPU sequence-parallel run has not finished in"))
      << lost;
  EXPECT_EQ(engine_->HungRequests(), 1);
  const std::string work = engine_->GpuWork();
  EXPECT_TRUE(absl::StrContains(work, "a sequence-parallel run running for ")) << work;
  Submit(2, -1, 500);
  Submit(3, 0);
  ASSERT_TRUE(WaitFor([&] { return failed_.load() == 2; }, absl::Milliseconds(500)));
  EXPECT_EQ(ok_.load(), 0);
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 1);
  EXPECT_EQ(engine_->HungRequests(), 0);
}

// A hung device can hold the engine thread in the next job's start instead of its wait for the
// hung one (a CUDA call there waits for the device): the watchdog times the job in flight, so it
// finds the hang there too.
TEST_F(EngineThreads, AHangFoundWhileTheNextJobStarts) {
  auto executor = std::make_unique<HangingExecutor>(pool_.get(), absl::Seconds(2));
  HangingExecutor* hanging = executor.get();
  std::vector<std::unique_ptr<Executor>> executors;
  executors.push_back(std::move(executor));
  StartWithAll(std::move(executors), absl::ZeroDuration(), nullptr, absl::Milliseconds(300));
  Submit(1, -1);
  Submit(2, -1);
  ASSERT_TRUE(WaitFor([&] { return hanging->in_second_start.load(); }));
  ASSERT_TRUE(WaitFor([&] { return !engine_->DeviceLost().ok(); }, absl::Seconds(1)));
  EXPECT_TRUE(hanging->in_second_start.load()) << "found only once the start had returned";
  EXPECT_TRUE(absl::StrContains(engine_->DeviceLost().message(), "a GPU job has not finished in"));
  EXPECT_TRUE(
      absl::StrContains(engine_->DeviceLost().message(), "(--gpu-job-timeout-seconds 300ms)"));
  EXPECT_EQ(engine_->HungRequests(), 2) << "the job in flight's and the one starting";
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 2);
  EXPECT_EQ(engine_->HungRequests(), 0);
}

TEST_F(EngineThreads, JobsWithinTheTimeoutKeepTheGpusServing) {
  IdleLog idle;
  StartWithAll(TimedJobs(&idle, absl::Milliseconds(100)), absl::ZeroDuration(), nullptr,
               absl::Milliseconds(300));
  for (int64_t id = 1; id <= 8; ++id) Submit(id, -1);
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 8);
  EXPECT_TRUE(engine_->DeviceLost().ok()) << engine_->DeviceLost();
}

// Several threads enqueue into one model's batcher at once (three batch keys, two priorities,
// sequences long enough for the gang runner among them) while another cancels queued requests;
// some requests arrive already expired. Every request completes exactly once: OK, or CANCELLED
// only if it was cancelled, or DEADLINE_EXCEEDED only if its deadline was set. Under
// ThreadSanitizer in CI, this is the batcher's and the engine's race test.
TEST_F(EngineThreads, BatcherUnderConcurrentProducersAndCancellations) {
  Start({0, 1}, /*gang=*/true,
        R"pb(max_batch_size: 8
             dynamic_batching { max_queue_delay_microseconds: 2000 priority_levels: 2 })pb");
  constexpr int kProducers = 4;
  constexpr int kPerProducer = 150;
  constexpr int kRequests = kProducers * kPerProducer;
  struct Outcome {
    std::atomic<int> calls{0};
    std::atomic<int> code{-1};
    std::atomic<bool> expired{false};
  };
  std::vector<Outcome> outcomes(kRequests);
  std::vector<std::shared_ptr<std::atomic<bool>>> flags(kRequests);
  for (auto& f : flags) f = std::make_shared<std::atomic<bool>>(false);
  std::atomic<int> enqueued{0};

  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      absl::BitGen rng;
      for (int i = 0; i < kPerProducer; ++i) {
        const int index = p * kPerProducer + i;
        auto r = std::make_unique<InferenceRequest>();
        r->model = model_.get();
        r->batch = 1;
        r->seq_len = absl::Uniform(rng, 0, 20) == 0 ? 200 : absl::Uniform(rng, 1, 64);
        r->batch_key = absl::StrCat("key", absl::Uniform(rng, 0, 3));
        r->priority = absl::Uniform(rng, 1, 3);
        r->cancelled = flags[index];
        if (absl::Uniform(rng, 0, 10) == 0) {
          r->deadline = MonotonicNow() - absl::Milliseconds(1);
          outcomes[index].expired = true;
        }
        r->done = [&outcomes, index](InferenceRequest&, const absl::Status& s,
                                     const RequestTimings&) {
          outcomes[index].code = static_cast<int>(s.code());
          outcomes[index].calls.fetch_add(1);
        };
        model_->scheduler().Enqueue(std::move(r));
        enqueued.fetch_add(1);
        if (i % 16 == 0) absl::SleepFor(absl::Microseconds(200));
      }
    });
  }
  std::thread canceller([&] {
    absl::BitGen rng;
    while (enqueued.load() < kRequests) {
      flags[absl::Uniform(rng, 0, kRequests)]->store(true);
      absl::SleepFor(absl::Microseconds(300));
    }
  });
  for (auto& t : producers) t.join();
  canceller.join();
  model_->scheduler().Shutdown();  // sends what it still holds to the engine
  engine_->Shutdown();

  int ok = 0;
  for (int i = 0; i < kRequests; ++i) {
    const Outcome& o = outcomes[i];
    ASSERT_EQ(o.calls.load(), 1) << "request " << i << " completed " << o.calls.load() << " times";
    const auto code = static_cast<absl::StatusCode>(o.code.load());
    if (code == absl::StatusCode::kOk) {
      ++ok;
    } else if (code == absl::StatusCode::kCancelled) {
      EXPECT_TRUE(flags[i]->load()) << "request " << i << " cancelled without being cancelled";
    } else {
      EXPECT_EQ(code, absl::StatusCode::kDeadlineExceeded) << "request " << i;
      EXPECT_TRUE(o.expired.load()) << "request " << i << " expired without a deadline";
    }
  }
  EXPECT_GT(ok, kRequests / 2);
  EXPECT_EQ(gang_->overlapped(), 0) << "a gang run overlapped an executor's job";
  absl::MutexLock lock(&log_.mu);
  EXPECT_EQ(log_.runs[1], ok) << "runs and OK completions differ";
}

// Without dynamic_batching every request runs alone, however many wait (Triton's meaning;
// max_batch_size then only bounds B); with it, the requests that queue behind a running job
// share the next one.
TEST_F(EngineThreads, OnlyDynamicBatchingJoinsRequests) {
  for (const bool dynamic : {false, true}) {
    SCOPED_TRACE(dynamic ? "dynamic_batching" : "max_batch_size alone");
    log_.jobs = 0;
    log_.widest = 0;
    ok_ = 0;
    Start({0}, false, dynamic ? "max_batch_size: 8 dynamic_batching {}" : "max_batch_size: 8");
    for (int i = 0; i < 8; ++i) model_->scheduler().Enqueue(Request(model_.get()));
    model_->scheduler().Shutdown();
    engine_->Shutdown();
    EXPECT_EQ(ok_.load(), 8);
    if (dynamic) {
      EXPECT_GT(log_.widest.load(), 1);
      EXPECT_LT(log_.jobs.load(), 8);
    } else {
      EXPECT_EQ(log_.widest.load(), 1);
      EXPECT_EQ(log_.jobs.load(), 8);
    }
    model_.reset();
    engine_.reset();
  }
}

// A batch fills up to max_batch_size sequences exactly, and to no more than max_batch_tokens
// tokens: the long queue delay means each batch forms only when the next request would not fit.
TEST_F(EngineThreads, BatchesFillUpToTheirLimitsAndNoFurther) {
  struct Case {
    const char* batching;
    int64_t seq_len;
    int widest;
  };
  const Case kCases[] = {
      {"max_batch_size: 4 dynamic_batching { max_queue_delay_microseconds: 10000000 }", 1, 4},
      {R"pb(max_batch_size: 8
            dynamic_batching { max_queue_delay_microseconds: 10000000 }
            parameters {
              key: "max_batch_tokens"
              value { string_value: "300" }
            })pb",
       100, 3},
  };
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.batching);
    log_.jobs = 0;
    log_.widest = 0;
    ok_ = 0;
    Start({0}, false, c.batching);
    for (int i = 0; i < 12; ++i) {
      std::unique_ptr<InferenceRequest> r = Request(model_.get());
      r->seq_len = c.seq_len;
      model_->scheduler().Enqueue(std::move(r));
    }
    // Every batch but the last is full by the twelfth request, so they run long before the
    // queue delay; the last one runs at the shutdown.
    EXPECT_TRUE(WaitFor([&] { return ok_.load() >= 12 - c.widest; }, absl::Seconds(5)));
    model_->scheduler().Shutdown();
    engine_->Shutdown();
    EXPECT_EQ(ok_.load(), 12);
    EXPECT_EQ(log_.widest.load(), c.widest);
    EXPECT_EQ(log_.jobs.load(), 12 / c.widest);
    model_.reset();
    engine_.reset();
  }
}

// A full queue of cancelled requests refuses nothing: the batcher, waiting out a long queue
// delay, has not dropped them yet, so the request arriving makes room by dropping them itself.
TEST_F(EngineThreads, CancelledRequestsHoldNoPlaceInAFullQueue) {
  Start({0}, false,
        "max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 10000000 "
        "default_queue_policy { max_queue_size: 2 } }");
  std::vector<std::shared_ptr<std::atomic<bool>>> cancels;
  for (int i = 0; i < 2; ++i) {
    std::unique_ptr<InferenceRequest> r = Request(model_.get());
    cancels.push_back(r->cancelled);
    model_->scheduler().Enqueue(std::move(r));
  }
  ASSERT_EQ(model_->scheduler().queued(), 2u);
  // Let the batcher settle into its queue delay, so that the new request finds the queue full
  // (woken by the second request, it could otherwise sweep the cancelled ones first: that too
  // must refuse nothing, but the sweep on arrival would go untested).
  absl::SleepFor(absl::Milliseconds(100));
  for (const auto& c : cancels) *c = true;
  model_->scheduler().Enqueue(Request(model_.get()));
  EXPECT_EQ(model_->scheduler().queued(), 1u) << "the new request was refused";
  // Answered by whichever thread swept them, the batcher's possibly after Enqueue returned.
  EXPECT_TRUE(WaitFor([&] { return failed_.load() == 2; }))
      << "the cancelled ones, answered CANCELLED: " << failed_.load();
  model_->scheduler().Shutdown();
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 1);
  EXPECT_EQ(failed_.load(), 2);
}

// A batch handed to the engine waits behind the job running on its device; a request whose
// timeout passes meanwhile is answered DEADLINE_EXCEEDED and never computed (Engine::MakeJob).
TEST_F(EngineThreads, ARequestThatExpiresBehindARunningJobIsNeverComputed) {
  std::atomic<int> ran{0};
  StartWith(std::make_unique<SlowExecutor>(pool_.get(), &ran), absl::ZeroDuration());
  absl::Mutex mu;
  absl::Status late_status;
  absl::Notification late_done;
  auto submit = [&](absl::Time deadline, bool late) {
    auto r = std::make_unique<InferenceRequest>();
    r->model = model_.get();
    r->batch = 1;
    r->seq_len = 1;
    r->deadline = deadline;
    r->done = [&, late](InferenceRequest&, const absl::Status& s, const RequestTimings&) {
      if (!late) return;
      absl::MutexLock lock(&mu);
      late_status = s;
      late_done.Notify();
    };
    SubmitAlone(std::move(r));
  };
  submit(absl::InfiniteFuture(), false);
  submit(MonotonicNow() + absl::Milliseconds(100), true);  // queued behind the 300 ms job
  ASSERT_TRUE(late_done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  engine_->Shutdown();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(late_status.code(), absl::StatusCode::kDeadlineExceeded) << late_status;
  EXPECT_EQ(ran.load(), 1);
}

// Block-sparse requests are checked alone against the cap on kept block pairs, which the plan of
// a batch applies to its sum: the batcher keeps that sum within the cap, so that a request
// accepted alone is not refused for what it was batched with. Small ones still share batches.
TEST_F(EngineThreads, BatchesKeepTheirKeptBlockPairsWithinTheCap) {
  Start({0}, false, "max_batch_size: 8 dynamic_batching {}");
  const int64_t big = block_sparse::kMaxKeptPairs / 2 + 1;
  for (int i = 0; i < 8; ++i) {
    std::unique_ptr<InferenceRequest> r = Request(model_.get());
    r->kept_pairs = i < 4 ? big : 1000;
    model_->scheduler().Enqueue(std::move(r));
  }
  model_->scheduler().Shutdown();
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 8);
  // The four big ones each run alone; the four small ones may join the last big one or each other.
  EXPECT_GE(log_.jobs.load(), 4);
  EXPECT_LE(log_.max_kept_pairs.load(), block_sparse::kMaxKeptPairs);
  model_.reset();
  engine_.reset();
}

// One device has one engine slot. A batch waiting for its preferred size or queue delay must
// not hold it: another model's request runs meanwhile, not after the delay.
TEST_F(EngineThreads, ABatchWaitingForItsDelayDoesNotHoldTheDevice) {
  Start({0}, false,
        R"pb(max_batch_size: 8
             dynamic_batching {
               preferred_batch_size: [ 4 ]
               max_queue_delay_microseconds: 3000000
             })pb");
  absl::StatusOr<ModelSpec> spec = Spec("other", "max_batch_size: 8 dynamic_batching {}");
  ASSERT_TRUE(spec.ok()) << spec.status();
  Model other(*std::move(spec), engine_.get(), metrics_.get());
  const absl::Time start = MonotonicNow();
  model_->scheduler().Enqueue(Request(model_.get()));  // waits up to 3 s for three more
  absl::SleepFor(absl::Milliseconds(20));
  other.scheduler().Enqueue(Request(&other));
  while (ok_.load() < 1 && MonotonicNow() < start + absl::Seconds(10)) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(ok_.load(), 1);
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(2)) << "the other model waited for the delay";
  model_->scheduler().Flush();
  model_->scheduler().Shutdown();
  other.scheduler().Shutdown();
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 2);
  EXPECT_EQ(failed_.load(), 0);
}

// A step of the wall clock back while requests wait (modelled as wall_clock_shift.h says)
// delays neither a batch waiting out its queue delay nor the expiry of a request's deadline.
TEST_F(EngineThreads, AWallClockStepBackDelaysNoBatchAndNoDeadline) {
  if (!testing::AbseilWaitsFollowTheWallClock()) {
    GTEST_SKIP() << "this Abseil's timed waits do not follow the wall clock";
  }
  Start({0}, false, "max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 200000 }");
  absl::StatusOr<ModelSpec> spec = Spec(
      "other", "max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 30000000 }");
  ASSERT_TRUE(spec.ok()) << spec.status();
  Model other(*std::move(spec), engine_.get(), metrics_.get());
  const testing::WallClockAhead step(absl::Milliseconds(2500));
  // Room for a loaded machine, well short of the step.
  const absl::Duration on_time = absl::Milliseconds(200) + absl::Milliseconds(1500);

  const absl::Time queued = MonotonicNow();
  model_->scheduler().Enqueue(Request(model_.get()));  // waits 200 ms for company
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 1; }));
  EXPECT_GE(MonotonicNow() - queued, absl::Milliseconds(200));
  EXPECT_LT(MonotonicNow() - queued, on_time) << "the queue delay lasted the step";

  const absl::Time expiring = MonotonicNow();
  std::unique_ptr<InferenceRequest> r = Request(&other);
  r->deadline = expiring + absl::Milliseconds(200);  // long before the 30 s delay
  other.scheduler().Enqueue(std::move(r));
  ASSERT_TRUE(WaitFor([&] { return failed_.load() == 1; }));
  EXPECT_GE(MonotonicNow() - expiring, absl::Milliseconds(200));
  EXPECT_LT(MonotonicNow() - expiring, on_time) << "the deadline came the step late";

  other.scheduler().Shutdown();
  model_->scheduler().Shutdown();
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 1);
}

// Two jobs that each need most of the pool, one after the other: the second must not wait out
// the pool's time (10 s) for buffers that the job in flight returns only once it is finished,
// nor fail; the engine finishes that job first and starts the second again.
TEST_F(EngineThreads, AJobWaitingForTheInFlightJobsBuffersDoesNotStall) {
  std::vector<std::unique_ptr<Executor>> executors;
  executors.push_back(std::make_unique<PoolHoldingExecutor>(pool_.get()));
  auto engine = Engine::CreateWith(std::move(executors), nullptr);
  ASSERT_TRUE(engine.ok());
  engine_ = *std::move(engine);
  absl::StatusOr<ModelSpec> spec = Spec("m", "");
  ASSERT_TRUE(spec.ok()) << spec.status();
  model_ = std::make_unique<Model>(*std::move(spec), engine_.get(), metrics_.get());
  const absl::Time start = MonotonicNow();
  for (int64_t id = 1; id <= 4; ++id) Submit(id, -1);
  engine_->Shutdown();
  EXPECT_EQ(ok_.load(), 4);
  EXPECT_EQ(failed_.load(), 0);
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(5));
}

// An idle engine thread releases its executor's pool memory cached a whole interval (looking
// every half interval), never while a job of its executor is in flight, and what a job returned
// goes back within one and a half intervals of its end.
TEST_F(EngineThreads, AnIdleEngineReleasesPoolMemoryButNeverDuringAJob) {
  constexpr absl::Duration kInterval = absl::Milliseconds(100);
  IdleLog idle;
  const absl::Time started = MonotonicNow();
  StartWith(std::make_unique<IdleRecordingExecutor>(&idle, pool_.get(), 3 * kInterval), kInterval);
  ASSERT_TRUE(WaitFor([&] { return idle.Calls().size() >= 2; }));
  for (const IdleLog::Call& call : idle.Calls()) {
    EXPECT_GE(call.at - started, kInterval / 2);
    EXPECT_GE(call.at - call.cutoff, kInterval);
    EXPECT_LT(call.at - call.cutoff, kInterval + absl::Milliseconds(250));
  }

  // Each job is in flight for three intervals, the next one started before the engine waits for
  // it: looks would fall inside them, and between them.
  const absl::Time submitted = MonotonicNow();
  for (int64_t id = 1; id <= 4; ++id) Submit(id, -1);
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 4; }));
  const absl::Time finished = MonotonicNow();
  EXPECT_LT(finished - submitted, 4 * 3 * kInterval + absl::Seconds(2));
  EXPECT_EQ(idle.during_job.load(), 0) << "released memory while a job was in flight";

  auto past_the_job = [&] {
    for (const IdleLog::Call& call : idle.Calls()) {
      if (call.cutoff >= finished) return true;
    }
    return false;
  };
  ASSERT_TRUE(WaitFor(past_the_job)) << "what the job returned was never released";
  absl::Duration first_release = absl::InfiniteDuration();
  for (const IdleLog::Call& call : idle.Calls()) {
    if (call.cutoff >= finished) {
      EXPECT_GE(call.at - finished, kInterval);
      first_release = std::min(first_release, call.at - finished);
    }
  }
  // Looks come every half interval, so what a job returned is released by one and a half
  // intervals after it (plus scheduling slack), not whenever the thread next happens to wake.
  EXPECT_LE(first_release, kInterval * 3 / 2 + absl::Milliseconds(250));
  engine_->Shutdown();
  EXPECT_EQ(idle.during_job.load(), 0);
}

// The C heap is trimmed at a look after work, once, and again only when a release frees memory:
// an idle server does not walk its heap at every look.
TEST_F(EngineThreads, AnIdleEngineTrimsTheHeapOnlyAfterWorkOrARelease) {
  constexpr absl::Duration kInterval = absl::Milliseconds(60);
  IdleLog idle;
  memory::TakeHeapFreed();  // no RPC ended here
  StartWith(std::make_unique<IdleRecordingExecutor>(&idle, pool_.get(), absl::Milliseconds(5)),
            kInterval, idle.Trim());
  ASSERT_TRUE(WaitFor([&] { return idle.Calls().size() >= 3; }));
  EXPECT_EQ(idle.trims.load(), 0) << "trimmed before any work";

  // An RPC that ran no job (refused, say) still freed its messages.
  memory::NoteHeapFreed();
  ASSERT_TRUE(WaitFor([&] { return idle.trims.load() == 1; })) << "an RPC's end left no trim";
  idle.trims = 0;

  Submit(1, -1);
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 1; }));
  ASSERT_TRUE(WaitFor([&] { return idle.trims.load() >= 1; })) << "never trimmed after a job";
  size_t looks = idle.Calls().size();
  ASSERT_TRUE(WaitFor([&] { return idle.Calls().size() >= looks + 4; }));
  EXPECT_EQ(idle.trims.load(), 1) << "trimmed again with nothing new to hand back";

  idle.freed_per_release = 4096;
  looks = idle.Calls().size();
  ASSERT_TRUE(WaitFor([&] { return idle.Calls().size() >= looks + 3; }));
  EXPECT_GE(idle.trims.load(), 3) << "a release that freed memory was not followed by a trim";
  engine_->Shutdown();
  EXPECT_EQ(idle.trims_during_job.load(), 0);
}

// One device's thread idle while another's runs a job looks and releases its own pools, but
// leaves the heap alone until no job runs anywhere.
TEST_F(EngineThreads, NoHeapTrimWhileAnyDeviceRunsAJob) {
  constexpr absl::Duration kInterval = absl::Milliseconds(40);
  IdleLog fast_log, slow_log;
  std::vector<std::unique_ptr<Executor>> executors;
  executors.push_back(
      std::make_unique<IdleRecordingExecutor>(&fast_log, pool_.get(), absl::Milliseconds(5), 0));
  executors.push_back(
      std::make_unique<IdleRecordingExecutor>(&slow_log, pool_.get(), absl::Milliseconds(800), 1));
  // Each trim checks both devices for a job in flight.
  std::atomic<int> trims_total{0}, trims_during_job{0};
  StartWithAll(std::move(executors), kInterval, [&] {
    if (fast_log.in_flight.load() + slow_log.in_flight.load() != 0) trims_during_job.fetch_add(1);
    trims_total.fetch_add(1);
  });
  // A request for each GPU at once, the slow one first, so that it is running or queued when the
  // fast one finishes (leaving the heap to trim).
  Submit(2, 1);
  Submit(1, 0);
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 2; }));
  EXPECT_EQ(trims_during_job.load(), 0) << "trimmed the heap while a device ran a job";
  ASSERT_TRUE(WaitFor([&] { return trims_total.load() >= 1; })) << "never trimmed once idle";
  engine_->Shutdown();
  EXPECT_EQ(trims_during_job.load(), 0);
}

TEST_F(EngineThreads, NoIdleReleaseWhenDisabled) {
  IdleLog idle;
  StartWith(std::make_unique<IdleRecordingExecutor>(&idle, pool_.get(), absl::Milliseconds(5)),
            absl::ZeroDuration());
  Submit(1, -1);
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 1; }));
  absl::SleepFor(absl::Milliseconds(300));
  engine_->Shutdown();
  EXPECT_TRUE(idle.Calls().empty());
}

// The thread's wait for its next look still wakes at once for work and for a shutdown.
TEST_F(EngineThreads, IdleReleaseDelaysNeitherWorkNorShutdown) {
  IdleLog idle;
  StartWith(std::make_unique<IdleRecordingExecutor>(&idle, pool_.get(), absl::ZeroDuration()),
            absl::Hours(1));
  absl::SleepFor(absl::Milliseconds(20));  // the thread is waiting by now
  absl::Time start = MonotonicNow();
  Submit(1, -1);
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 1; }));
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(2));
  start = MonotonicNow();
  engine_->Shutdown();
  EXPECT_LT(MonotonicNow() - start, absl::Seconds(2));
  EXPECT_TRUE(idle.Calls().empty());
}

// Each device's thread accounts for its time by phase, and the phases add up to the thread's
// life: a job's Start in "start", its Wait in "wait", an idle release and its heap trim in
// "release", and no work in "idle"; the requests' responses are sent by its completion thread,
// so the thread's "complete" is only handing them over.
TEST_F(EngineThreads, ThreadTimesLandInTheirPhasesAndAddUpToTheThreadsLife) {
  IdleLog idle;
  const absl::Time before = MonotonicNow();
  // Start takes 20 ms, Wait 40, the heap trim 25; idle memory is released after 100 ms.
  StartWith(std::make_unique<IdleRecordingExecutor>(&idle, pool_.get(), absl::Milliseconds(40),
                                                    /*device=*/3),
            absl::Milliseconds(100), [] { absl::SleepFor(absl::Milliseconds(25)); });
  const absl::Time after = MonotonicNow();
  absl::SleepFor(absl::Milliseconds(60));
  for (int64_t id = 1; id <= 3; ++id) {
    auto r = std::make_unique<InferenceRequest>();
    r->model = model_.get();
    r->batch = id;
    r->seq_len = 1;
    r->done = [this](InferenceRequest&, const absl::Status& s, const RequestTimings&) {
      absl::SleepFor(absl::Milliseconds(10));  // a slow response
      (s.ok() ? ok_ : failed_).fetch_add(1);
    };
    SubmitAlone(std::move(r));
  }
  ASSERT_TRUE(WaitFor([&] { return ok_.load() == 3; }));
  ASSERT_TRUE(WaitFor([&] { return !idle.Calls().empty(); }));
  absl::SleepFor(absl::Milliseconds(60));  // past the trim
  const absl::Time read_from = MonotonicNow();
  const std::vector<EngineThreadTimes> times = engine_->ThreadTimes();
  const absl::Time read_to = MonotonicNow();
  ASSERT_EQ(times.size(), 1u);
  EXPECT_EQ(times[0].device, "cuda:3");
  auto phase = [&](EnginePhase p) { return times[0].phase[static_cast<int>(p)]; };
  EXPECT_GE(phase(EnginePhase::kStart), absl::Milliseconds(60));
  EXPECT_GE(phase(EnginePhase::kWait), absl::Milliseconds(120));
  EXPECT_GT(phase(EnginePhase::kComplete), absl::ZeroDuration());
  EXPECT_LT(phase(EnginePhase::kComplete), absl::Milliseconds(10));  // three 10 ms responses
  EXPECT_GE(phase(EnginePhase::kRelease), absl::Milliseconds(25));
  EXPECT_GE(phase(EnginePhase::kIdle), absl::Milliseconds(80));  // 60 before, 35 after the trim
  EXPECT_EQ(phase(EnginePhase::kGang), absl::ZeroDuration());
  // Bookkeeping is short beside the sleeps (sanitizer builds included).
  EXPECT_LT(phase(EnginePhase::kOther), absl::Milliseconds(50));
  absl::Duration sum;
  for (const absl::Duration d : times[0].phase) sum += d;
  EXPECT_GE(sum, read_from - after);
  EXPECT_LE(sum, read_to - before);
  // The phase names the metric's labels take, each distinct.
  std::set<std::string> names;
  for (int p = 0; p < kEnginePhases; ++p)
    names.insert(EnginePhaseName(static_cast<EnginePhase>(p)));
  EXPECT_EQ(names.size(), static_cast<size_t>(kEnginePhases));
  EXPECT_TRUE(names.count("idle") && names.count("wait") && names.count("start"));
  // Before `idle` goes: the thread's idle releases (every 100 ms) record into it until then.
  engine_->Shutdown();
}

// A response that takes long to send (gRPC writing to a slow socket, an output copied to shared
// memory) does not hold up the engine thread, which goes on running the jobs after it; their
// responses follow it, in the order the jobs ran.
TEST_F(EngineThreads, ASlowResponseDoesNotHoldUpTheEngineAndResponsesKeepTheirOrder) {
  Start({0});
  absl::Notification release;
  absl::Mutex order_mu;
  std::vector<int64_t> order;
  // From another thread: an engine thread held by the slow response would take no more
  // batches, and Submit would wait for a slot.
  std::thread submit([&] {
    for (int64_t id = 1; id <= 5; ++id) {
      auto r = std::make_unique<InferenceRequest>();
      r->model = model_.get();
      r->batch = id;
      r->seq_len = 1;
      r->done = [&, id](InferenceRequest&, const absl::Status& s, const RequestTimings&) {
        if (id == 1) release.WaitForNotification();
        EXPECT_TRUE(s.ok()) << s;
        absl::MutexLock lock(&order_mu);
        order.push_back(id);
      };
      SubmitAlone(std::move(r));
    }
  });
  EXPECT_TRUE(
      WaitFor([&] { return log_.jobs.load() == 5 && log_.active.load() == 0; }, absl::Seconds(5)))
      << log_.jobs.load() << " of 5 jobs ran while the first one's response waits";
  {
    absl::MutexLock lock(&order_mu);
    EXPECT_TRUE(order.empty());
  }
  release.Notify();
  submit.join();
  engine_->Shutdown();  // every response sent by then
  absl::MutexLock lock(&order_mu);
  EXPECT_EQ(order, (std::vector<int64_t>{1, 2, 3, 4, 5}));
}

}  // namespace
}  // namespace dilattn::server
