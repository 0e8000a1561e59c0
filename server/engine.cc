#include "server/engine.h"

#include <algorithm>
#include <iterator>
#include <new>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kernels/common/clock.h"
#include "kernels/common/quote.h"
#include "kernels/memory/allocator.h"
#include "server/log.h"
#include "server/model.h"

namespace dilattn::server {
namespace {

// Host allocations inside an executor (tile lists, staging vectors) throw std::bad_alloc when a
// problem's lists outgrow the machine; on the engine's thread that would end the process, so it
// becomes the job's RESOURCE_EXHAUSTED.
template <typename F>
absl::Status Guarded(F&& run) {
  try {
    return run();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of host memory while running the job");
  }
}

// The GPUs `device` names: every visible one for "auto" and "cuda", the listed ones for
// "cuda:N,M,..."; none for "cpu" (or "auto" without a GPU).
absl::StatusOr<std::vector<int>> ParseDevices(const std::string& d) {
  std::vector<int> devices;
  if (d == "auto" || d == "cuda") {
    const int count = memory::CudaDeviceCount();
    for (int i = 0; i < count; ++i) devices.push_back(i);
    // "cuda" without a GPU fails on device 0 below, naming it.
    if (d == "cuda" && devices.empty()) devices.push_back(0);
  } else if (absl::StartsWith(d, "cuda:")) {
    for (absl::string_view part : absl::StrSplit(d.substr(5), ',')) {
      int n = -1;
      if (!absl::SimpleAtoi(part, &n) || n < 0 ||
          std::find(devices.begin(), devices.end(), n) != devices.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--device ", Quote(d), ": bad or repeated device number ", Quote(part)));
      }
      devices.push_back(n);
    }
  } else if (d != "cpu") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--device ", Quote(d), " is not one of auto, cpu, cuda, cuda:N, cuda:N,M,..."));
  }
  return devices;
}

}  // namespace

const char* EnginePhaseName(EnginePhase p) {
  // In EnginePhase's order.
  static constexpr const char* kNames[] = {"idle", "start",   "wait", "complete",
                                           "gang", "release", "other"};
  static_assert(std::size(kNames) == kEnginePhases);
  return kNames[static_cast<int>(p)];
}

PhaseClock::PhaseClock() : since_(MonotonicNow()) {}

EnginePhase PhaseClock::Enter(EnginePhase p) {
  const absl::Time now = MonotonicNow();
  absl::MutexLock lock(&mu_);
  const EnginePhase ended = current_;
  total_[static_cast<int>(ended)] += now - since_;
  current_ = p;
  since_ = now;
  return ended;
}

std::pair<EnginePhase, absl::Time> PhaseClock::Current() const {
  absl::MutexLock lock(&mu_);
  return {current_, since_};
}

std::array<absl::Duration, kEnginePhases> PhaseClock::Read() const {
  const absl::Time now = MonotonicNow();
  absl::MutexLock lock(&mu_);
  std::array<absl::Duration, kEnginePhases> out = total_;
  out[static_cast<int>(current_)] += now - since_;
  return out;
}

Completer::Completer() : thread_([this] { Loop(); }) {}

Completer::~Completer() { Stop(); }

void Completer::Add(std::vector<Item> items) {
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      for (Item& item : items) queue_.push_back(std::move(item));
      return;
    }
  }
  for (Item& item : items) Finish(item);
}

void Completer::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void Completer::Loop() {
  while (true) {
    Item item;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return !queue_.empty() || stopping_; };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, and everything added is done
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    Finish(item);
  }
}

void Completer::Finish(Item& item) {
  InferenceRequest& r = *item.request;
  absl::Status s = item.status;
  if (s.ok()) s = r.failed;
  if (s.ok()) s = CompleteHostOutput(r);
  CompleteRequest(std::move(item.request), s, item.timings);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::vector<std::unique_ptr<Executor>> executors;
  absl::StatusOr<std::vector<int>> devices = ParseDevices(options.device);
  if (!devices.ok()) return devices.status();
  if (!devices->empty()) {
    absl::Status failed = absl::OkStatus();
    SharedHostPools shared;
    absl::StatusOr<std::shared_ptr<memory::BufferPool>> pinned =
        CreatePinnedPool(options.executor);
    absl::StatusOr<std::shared_ptr<memory::BufferPool>> host = CreateHostPool(options.executor);
    if (!pinned.ok()) failed = pinned.status();
    if (!host.ok()) failed = host.status();
    if (failed.ok()) shared = {*std::move(pinned), *std::move(host)};
    for (int device : *devices) {
      if (!failed.ok()) break;
      absl::StatusOr<std::unique_ptr<Executor>> executor =
          CreateCudaExecutor(options.executor, device, shared);
      if (executor.ok()) {
        executors.push_back(*std::move(executor));
      } else if (options.device == "auto") {
        // "auto" means the devices that work: a GPU the kernels cannot use is left out.
        LogWarning("GPU %d unusable (%s); left out", device, executor.status().ToString());
      } else {
        failed = executor.status();
      }
    }
    if (!failed.ok()) {
      if (options.device != "auto") return failed;
      LogWarning("GPUs unusable (%s); serving on the CPU", failed.ToString());
      executors.clear();
    }
  }
  if (executors.empty()) {
    const int engines = options.cpu_engines;
    if (engines < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cpu-engines must be >= 1, got ", options.cpu_engines));
    }
    std::shared_ptr<memory::BufferPool> host;
    if (engines > 1) {
      absl::StatusOr<std::shared_ptr<memory::BufferPool>> made = CreateHostPool(options.executor);
      if (!made.ok()) return made.status();
      host = *std::move(made);
    }
    const int threads = options.executor.cpu_threads > 0
                            ? options.executor.cpu_threads
                            : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    for (int i = 0; i < engines; ++i) {
      ExecutorOptions share = options.executor;
      share.cpu_threads = std::max(1, threads / engines + (i < threads % engines ? 1 : 0));
      absl::StatusOr<std::unique_ptr<Executor>> executor = CreateCpuExecutor(share, host);
      if (!executor.ok()) return executor.status();
      executors.push_back(*std::move(executor));
    }
    if (engines > 1) {
      LogInfo("CPU: %d engine threads, %d backend threads shared among them", engines,
              std::max(threads, engines));
    }
  } else if (options.cpu_engines != 1) {
    LogWarning("--cpu-engines %d left unused: the server runs on its GPUs", options.cpu_engines);
  }
  std::unique_ptr<GangRunner> gang;
  if (options.sequence_parallel_min_tokens > 0) {
    std::vector<int> gpus;
    for (const auto& e : executors) {
      if (e->cuda_device() >= 0) gpus.push_back(e->cuda_device());
    }
    absl::StatusOr<std::unique_ptr<GangRunner>> made = CreateSequenceParallelGang(
        gpus, options.sequence_parallel_min_tokens, &executors.front()->staging_pool(),
        options.executor.pool_wait, options.executor.device_pool_bytes);
    if (!made.ok()) {
      return absl::Status(made.status().code(), absl::StrCat("--sequence-parallel-min-tokens: ",
                                                             made.status().message()));
    }
    gang = *std::move(made);
    LogInfo("sequence parallelism: sequences of >= %d tokens run across %d GPUs",
            static_cast<int>(options.sequence_parallel_min_tokens), static_cast<int>(gpus.size()));
  }
  return CreateWith(std::move(executors), std::move(gang), options.pool_idle_release, nullptr,
                    options.gpu_job_timeout);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::CreateWith(
    std::vector<std::unique_ptr<Executor>> executors, std::unique_ptr<GangRunner> gang,
    absl::Duration pool_idle_release, std::function<void()> trim_heap,
    absl::Duration gpu_job_timeout) {
  if (executors.empty()) return absl::InvalidArgumentError("an engine needs an executor");
  std::unique_ptr<Engine> e(new Engine());
  e->executors_ = std::move(executors);
  e->idle_release_ = pool_idle_release;
  e->gpu_job_timeout_ = gpu_job_timeout;
  e->trim_heap_ = trim_heap != nullptr ? std::move(trim_heap) : memory::TrimMallocHeap;
  e->gang_ = std::move(gang);
  {
    absl::MutexLock lock(&e->mu_);
    e->free_slots_ = static_cast<int>(e->executors_.size());
  }
  for (const auto& executor : e->executors_) {
    e->workers_.push_back(std::make_unique<Worker>());
    e->workers_.back()->executor = executor.get();
  }
  for (const auto& worker : e->workers_) {
    e->threads_.emplace_back([engine = e.get(), w = worker.get()] { engine->Loop(*w); });
  }
  const bool on_gpus = std::any_of(e->executors_.begin(), e->executors_.end(),
                                   [](const auto& x) { return x->cuda_device() >= 0; });
  if (gpu_job_timeout > absl::ZeroDuration() && on_gpus) {
    e->watchdog_ = std::thread([engine = e.get()] { engine->Watch(); });
  }
  return e;
}

std::vector<EngineThreadTimes> Engine::ThreadTimes() const {
  std::vector<EngineThreadTimes> out;
  const bool several_on_cpu = std::count_if(workers_.begin(), workers_.end(), [](const auto& w) {
                                return w->executor->cuda_device() < 0;
                              }) > 1;
  int cpu_index = 0;
  for (const auto& worker : workers_) {
    const int device = worker->executor->cuda_device();
    std::string label = device >= 0      ? absl::StrCat("cuda:", device)
                        : several_on_cpu ? absl::StrCat("cpu:", cpu_index++)
                                         : "cpu";
    out.push_back({std::move(label), worker->clock.Read()});
  }
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].failed = lost_device_ >= 0 && workers_[i]->executor->cuda_device() == lost_device_;
  }
  return out;
}

absl::Status Engine::DeviceLost() const {
  absl::MutexLock lock(&mu_);
  return lost_;
}

void Engine::SetDeviceLostHandler(std::function<void(const absl::Status& error)> handler) {
  absl::MutexLock lock(&mu_);
  on_lost_ = std::move(handler);
}

void Engine::CheckDevice(Executor& executor, const absl::Status& s) {
  // Only faults inside the server can mean a lost device: not a client's error, a deadline, a
  // cancellation or memory the pools could not give.
  if (s.ok() || (!absl::IsInternal(s) && !absl::IsUnknown(s))) return;
  {
    absl::MutexLock lock(&mu_);
    if (!lost_.ok()) return;  // stopped already
  }
  const absl::Status device = executor.CheckDevice();
  if (device.ok()) return;
  StopGpus(executor.cuda_device(),
           absl::Status(device.code(),
                        absl::StrCat("cuda:", executor.cuda_device(), ": ", device.message(),
                                     ", a CUDA error after which the process's "
                                     "GPUs cannot be used")));
}

void Engine::StopGpus(int device, const absl::Status& error) {
  std::function<void(const absl::Status&)> handler;
  std::deque<Batch> queued;
  {
    absl::MutexLock lock(&mu_);
    if (!lost_.ok()) return;
    lost_ = error;
    lost_device_ = device;
    handler = on_lost_;
    // Refused here, and from now on in Submit, rather than by the engine threads: a hung device
    // holds its thread for good, and the only thread of a one-GPU server.
    queued.swap(queue_);
    free_slots_ += static_cast<int>(queued.size());
  }
  LogError(
      "%s: every GPU stops, and each request is answered UNAVAILABLE until the server is "
      "restarted",
      error.message());
  if (handler != nullptr) handler(error);
  for (Batch& batch : queued) Refuse(std::move(batch));
}

absl::Duration Engine::BusyFor(const Worker& worker, absl::Time now, bool* gang) {
  const auto [phase, phase_since] = worker.clock.Current();
  const bool in_gang = phase == EnginePhase::kGang;
  if (gang != nullptr) *gang = in_gang;
  const int64_t issued = worker.in_flight_since.load();
  if (!in_gang && issued == std::numeric_limits<int64_t>::max()) return absl::ZeroDuration();
  return std::max(now - (in_gang ? phase_since : absl::FromUnixNanos(issued)),
                  absl::ZeroDuration());
}

int Engine::HungRequests() const {
  {
    absl::MutexLock lock(&mu_);
    if (lost_.ok() || gpu_job_timeout_ <= absl::ZeroDuration()) return 0;
  }
  const absl::Time now = MonotonicNow();
  int held = 0;
  for (const auto& worker : workers_) {
    if (worker->executor->cuda_device() < 0) continue;
    if (BusyFor(*worker, now, nullptr) > gpu_job_timeout_) held += worker->held.load();
  }
  return held;
}

std::string Engine::GpuWork() const {
  const absl::Time now = MonotonicNow();
  std::vector<std::string> busy;
  for (const auto& worker : workers_) {
    const int device = worker->executor->cuda_device();
    if (device < 0) continue;
    bool gang = false;
    const absl::Duration d = BusyFor(*worker, now, &gang);
    if (d <= absl::ZeroDuration()) continue;
    busy.push_back(absl::StrCat("cuda:", device, ": a ", gang ? "sequence-parallel run" : "job",
                                " running for ",
                                absl::FormatDuration(absl::Trunc(d, absl::Milliseconds(100))), ", ",
                                worker->held.load(), " request(s)"));
  }
  return absl::StrJoin(busy, "; ");
}

void Engine::Watch() {
  // Looks often enough that a hang is found within a tenth of the timeout past it (at most a
  // second).
  const absl::Duration step = std::min(gpu_job_timeout_ / 10, absl::Seconds(1));
  absl::MutexLock lock(&mu_);
  auto stop = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stopping_ || !lost_.ok(); };
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop), step)) {
    const absl::Time now = MonotonicNow();
    for (const auto& worker : workers_) {
      const int device = worker->executor->cuda_device();
      if (device < 0) continue;
      bool gang = false;
      const absl::Duration busy = BusyFor(*worker, now, &gang);
      if (busy <= gpu_job_timeout_) continue;
      const absl::Status hung = absl::DeadlineExceededError(absl::StrCat(
          "cuda:", device, ": a GPU ", gang ? "sequence-parallel run" : "job",
          " has not finished in ", absl::FormatDuration(absl::Trunc(busy, absl::Milliseconds(100))),
          " (--gpu-job-timeout-seconds ",
          // Whole seconds as the flag gives them; a test's shorter timeout as it is.
          gpu_job_timeout_ % absl::Seconds(1) == absl::ZeroDuration()
              ? absl::StrCat(absl::ToInt64Seconds(gpu_job_timeout_))
              : absl::FormatDuration(gpu_job_timeout_),
          "); the device is taken as hung"));
      mu_.Unlock();
      StopGpus(device, hung);
      mu_.Lock();
      break;
    }
  }
}

absl::Status Engine::Available() const {
  const absl::Status lost = DeviceLost();
  if (lost.ok()) return lost;
  return absl::UnavailableError(absl::StrCat("this server's GPUs stopped after a device error (",
                                             lost.message(), "); retry on another replica"));
}

void Engine::Refuse(Batch batch) {
  const absl::Status s = Available();
  for (auto& r : batch.requests) CompleteRequest(std::move(r), s);
}

std::string Engine::backend_name() const {
  // A run of one name as "N x name": the CPU served by several threads (a GPU's names its device).
  std::vector<std::string> names;
  for (size_t i = 0; i < executors_.size();) {
    size_t j = i + 1;
    while (j < executors_.size() && executors_[j]->name() == executors_[i]->name()) ++j;
    names.push_back(j - i > 1 ? absl::StrCat(j - i, " x ", executors_[i]->name())
                              : executors_[i]->name());
    i = j;
  }
  return absl::StrJoin(names, "; ");
}

std::vector<const memory::BufferPool*> Engine::pools() const {
  std::vector<const memory::BufferPool*> out;
  auto add = [&out](const std::vector<const memory::BufferPool*>& pools) {
    for (const memory::BufferPool* pool : pools) {
      if (std::find(out.begin(), out.end(), pool) == out.end()) out.push_back(pool);
    }
  };
  for (const auto& executor : executors_) add(executor->pools());
  // The gang runner's own device pools ("sequence-parallel cuda:N") sit beside the executors'.
  if (gang_ != nullptr) add(gang_->pools());
  return out;
}

Engine::~Engine() { Shutdown(); }

bool Engine::AcquireSlot(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return free_slots_ > 0 || stopping_; };
  AwaitUntil(mu_, absl::Condition(&ready), deadline);
  if (stopping_ || free_slots_ == 0) return false;
  --free_slots_;
  return true;
}

void Engine::ReleaseSlot() {
  absl::MutexLock lock(&mu_);
  ++free_slots_;
}

void Engine::Submit(Batch batch) {
  batch.device = -1;
  batch.gang =
      gang_ != nullptr && batch.requests.size() == 1 && gang_->Takes(*batch.requests.front());
  if (!batch.requests.empty()) {
    const InferenceRequest& r = *batch.requests.front();
    for (int device : {r.input_device[0], r.input_device[1], r.input_device[2],
                       r.output_target.device}) {
      if (device >= 0) {
        batch.device = device;
        break;
      }
    }
  }
  {
    absl::MutexLock lock(&mu_);
    if (lost_.ok()) {
      queue_.push_back(std::move(batch));
      return;
    }
    ++free_slots_;  // the slot its scheduler reserved: no engine thread takes this batch
  }
  Refuse(std::move(batch));
}

bool Engine::Eligible(const Batch& batch, const Executor& executor) const {
  if (batch.device < 0 || batch.device == executor.cuda_device()) return true;
  // Tensors on a GPU no thread here runs: any thread takes it.
  return std::none_of(executors_.begin(), executors_.end(),
                      [&](const auto& e) { return e->cuda_device() == batch.device; });
}

bool Engine::HasWorkFor(const Executor& executor) const {
  if (gang_active_) return false;
  return std::any_of(queue_.begin(), queue_.end(),
                     [&](const Batch& b) { return Eligible(b, executor); });
}

std::unique_ptr<Batch> Engine::TakeFor(const Executor& executor) {
  if (gang_active_) return nullptr;
  const auto it = std::find_if(queue_.begin(), queue_.end(),
                               [&](const Batch& b) { return Eligible(b, executor); });
  if (it == queue_.end()) return nullptr;
  auto batch = std::make_unique<Batch>(std::move(*it));
  queue_.erase(it);
  if (batch->gang) {
    gang_active_ = true;
  } else {
    ++jobs_running_;
  }
  return batch;
}

void Engine::JobsDone(int n) {
  if (n == 0) return;
  absl::MutexLock lock(&mu_);
  jobs_running_ -= n;
  heap_dirty_ = true;
}

// Only started when no job runs anywhere: a trim walks every malloc arena under its lock, stalling
// the threads that allocate meanwhile, and hands back pages a busy thread would fault in again. And
// only when there is something to hand back, so that an idle server does not walk the heap at
// every look. A release that frees memory during another thread's trim leaves the heap dirty for
// the next look.
bool Engine::ReleaseDone(size_t freed) {
  absl::MutexLock lock(&mu_);
  if (memory::TakeHeapFreed() || freed > 0) heap_dirty_ = true;
  if (heap_dirty_ && !trimming_ && jobs_running_ == releasing_ && !gang_active_ && queue_.empty()) {
    // Still counted as running until TrimDone, so that a gang run waits for the trim too.
    heap_dirty_ = false;
    trimming_ = true;
    return true;
  }
  --jobs_running_;
  --releasing_;
  return false;
}

void Engine::TrimDone() {
  absl::MutexLock lock(&mu_);
  trimming_ = false;
  --jobs_running_;
  --releasing_;
}

void Engine::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (watchdog_.joinable()) watchdog_.join();
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  // Only now: the engine threads complete their last jobs through them.
  for (const auto& worker : workers_) worker->completer.Stop();
}

void Engine::Loop(Worker& worker) {
  Executor& executor = *worker.executor;
  PhaseClock& clock = worker.clock;
  std::unique_ptr<Job> in_flight;
  // Idle, the thread looks for pool buffers cached unused for idle_release_ every half of it, so
  // that each goes back within one and a half intervals of its return. Work does not postpone a
  // look, only delays it to the next idle moment: short gaps between jobs still reach it.
  const absl::Duration look_every = idle_release_ / 2;
  absl::Time next_look =
      idle_release_ > absl::ZeroDuration() ? MonotonicNow() + look_every : absl::InfiniteFuture();
  while (true) {
    std::unique_ptr<Batch> next;
    bool idle = false, release = false;
    {
      absl::MutexLock lock(&mu_);
      if (in_flight == nullptr) {
        auto ready = [this, &executor]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
          return HasWorkFor(executor) || (stopping_ && queue_.empty());
        };
        // Work and shutdown still wake it at once.
        bool woken = false;
        {
          PhaseScope phase(clock, EnginePhase::kIdle);
          woken = AwaitUntil(mu_, absl::Condition(&ready), next_look);
        }
        if (!woken) {
          idle = true;
          // Not while a gang run holds every GPU: a cudaFree would wait for it (and the run
          // trims the executors' device pools itself). Counted as a job, so that a gang run
          // waits for it in turn.
          // Nor once the GPUs stopped: freeing their memory fails.
          release = !gang_active_ && lost_.ok();
          if (release) {
            ++jobs_running_;
            ++releasing_;
          }
        } else if (!HasWorkFor(executor)) {
          return;  // stopping, nothing left
        }
      }
      if (!idle) {
        next = TakeFor(executor);
        if (next != nullptr) ++free_slots_;  // the next batch may form while this one runs
      }
    }
    if (idle) {
      // Outside the lock, and with no job of this executor in flight: cudaFree synchronizes.
      if (release) {
        PhaseScope phase(clock, EnginePhase::kRelease);
        // What the pools freed from the heap, and the message buffers and scratch of the jobs
        // before, would stay resident in malloc's arenas (on a GPU server too, where the pools
        // are pinned and device memory but the messages are on the heap).
        if (ReleaseDone(executor.ReleaseIdleMemory(MonotonicNow() - idle_release_))) {
          trim_heap_();
          TrimDone();
        }
      }
      next_look = MonotonicNow() + look_every;
      continue;
    }
    if (next != nullptr && next->gang) {
      if (in_flight != nullptr) {
        FinishJob(worker, std::move(in_flight));
        JobsDone(1);
      }
      RunGang(worker, std::move(*next));
      continue;
    }
    // A batch whose inputs are still being copied out of their messages would hold this thread
    // in Start() until they are, and the CPU executor computes the whole job in Start(): the
    // previous job finishes first, so that its responses do not wait for either.
    if (next != nullptr && in_flight != nullptr &&
        (!InputsInPlace(next->requests) || executor.cuda_device() < 0)) {
      FinishJob(worker, std::move(in_flight));
      JobsDone(1);
    }
    // Start the next batch before waiting for the previous one: its copies overlap the
    // previous kernel.
    std::unique_ptr<Job> started =
        next != nullptr ? StartJob(worker, std::move(*next), in_flight) : nullptr;
    int done = next != nullptr && started == nullptr ? 1 : 0;  // nothing of it left to wait for
    if (in_flight != nullptr) {
      FinishJob(worker, std::move(in_flight));
      ++done;
    }
    JobsDone(done);
    in_flight = std::move(started);
    if (in_flight != nullptr) worker.in_flight_since.store(absl::ToUnixNanos(in_flight->issued));
  }
}

void Engine::RunGang(Worker& worker, Batch batch) {
  PhaseScope phase(worker.clock, EnginePhase::kGang);
  {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return jobs_running_ == 0; };
    mu_.Await(absl::Condition(&idle));
  }
  // Every executor is idle: their cached device memory goes back for the split run, and the
  // run's own goes back after it.
  for (const auto& e : executors_) e->ReleaseCachedMemory();
  std::unique_ptr<Job> job = MakeJob(worker, std::move(batch));
  if (job != nullptr) {
    const absl::Status s = Guarded([&] { return gang_->Run(*job); });
    if (!s.ok()) {
      LogError("sequence-parallel run for %s failed: %s", job->model->name(), s.ToString());
    }
    CompleteJob(worker, *job, s);
    // Every executor is idle still (no thread takes a batch during the run): each may be asked.
    for (const auto& e : executors_) CheckDevice(*e, s);
  }
  gang_->ReleaseCachedMemory();
  absl::MutexLock lock(&mu_);
  gang_active_ = false;
  heap_dirty_ = true;
}

std::unique_ptr<Job> Engine::StartJob(Worker& worker, Batch batch,
                                      std::unique_ptr<Job>& in_flight) {
  std::unique_ptr<Job> job = MakeJob(worker, std::move(batch));
  if (job == nullptr) return nullptr;
  job->may_wait = in_flight == nullptr;
  auto start = [&] {
    PhaseScope phase(worker.clock, EnginePhase::kStart);
    return Guarded([&] { return worker.executor->Start(*job); });
  };
  absl::Status s = start();
  if (absl::IsResourceExhausted(s) && in_flight != nullptr) {
    // The pools may be full of the previous job's buffers, which come back once it is done.
    FinishJob(worker, std::move(in_flight));
    JobsDone(1);
    job->start = MonotonicNow();
    job->may_wait = true;
    s = start();
  }
  if (!s.ok()) {
    if (absl::IsCancelled(s)) {  // its clients are gone: no fault of the server's
      LogInfo("a job of %d request(s) for %s stopped: %s", static_cast<int>(job->requests.size()),
              job->model->name(), std::string(s.message()));
    } else {
      LogError("starting %d request(s) for %s failed: %s", static_cast<int>(job->requests.size()),
               job->model->name(), s.ToString());
    }
    {
      PhaseScope phase(worker.clock, EnginePhase::kComplete);
      worker.held.fetch_sub(static_cast<int>(job->requests.size()));
      for (auto& r : job->requests) CompleteRequest(std::move(r), s);
    }
    CheckDevice(*worker.executor, s);
    return nullptr;
  }
  job->issued = MonotonicNow();
  return job;
}

std::unique_ptr<Job> Engine::MakeJob(Worker& worker, Batch batch) {
  PhaseClock& clock = worker.clock;
  auto job = std::make_unique<Job>();
  job->model = batch.model;
  job->start = MonotonicNow();
  // Last look before computing: whatever was cancelled or expired since it was queued leaves now.
  for (auto& r : batch.requests) {
    if (r->cancelled->load()) {
      PhaseScope phase(clock, EnginePhase::kComplete);
      CompleteRequest(std::move(r), absl::CancelledError("request cancelled; it was not computed"));
    } else if (r->deadline <= job->start) {
      PhaseScope phase(clock, EnginePhase::kComplete);
      CompleteRequest(std::move(r), absl::DeadlineExceededError(
                                        "request timeout expired before execution; it was not "
                                        "computed"));
    } else {
      job->requests.push_back(std::move(r));
    }
  }
  if (job->requests.empty()) return nullptr;
  worker.held.fetch_add(static_cast<int>(job->requests.size()));
  const InferenceRequest& first = *job->requests.front();
  job->shape.dtype = first.dtype;
  job->shape.num_heads = first.heads;
  job->shape.head_dim = first.head_dim;
  for (const auto& r : job->requests) {
    for (int64_t b = 0; b < r->batch; ++b) job->shape.seq_lengths.push_back(r->seq_len);
  }
  return job;
}

void Engine::FinishJob(Worker& worker, std::unique_ptr<Job> job) {
  absl::Status s;
  {
    PhaseScope phase(worker.clock, EnginePhase::kWait);
    s = Guarded([&] { return worker.executor->Wait(*job); });
  }
  worker.in_flight_since.store(std::numeric_limits<int64_t>::max());
  CompleteJob(worker, *job, s);
  CheckDevice(*worker.executor, s);
}

void Engine::CompleteJob(Worker& worker, Job& job, const absl::Status& s) {
  PhaseScope phase(worker.clock, EnginePhase::kComplete);
  if (s.ok()) {
    int64_t sequences = 0;
    for (const auto& r : job.requests) sequences += r->batch;
    job.model->stats().Executed(sequences, job.compute_input, job.compute_infer, job.compute_output,
                                job.path);
  }
  worker.held.fetch_sub(static_cast<int>(job.requests.size()));
  std::vector<Completer::Item> items;
  items.reserve(job.requests.size());
  for (auto& r : job.requests) {
    const RequestTimings t{job.start - r->enqueued, job.compute_input, job.compute_infer,
                           job.compute_output};
    items.push_back({std::move(r), s, t});
  }
  worker.completer.Add(std::move(items));
}

}  // namespace dilattn::server
