#pragma once

// The engine runs the batches the models' schedulers form, one thread per GPU (on the CPU, one
// per --cpu-engines): each thread owns its executor (and, on a GPU, its streams), takes the next
// batch from the queue all threads share, and starts it before waiting for its previous one, so
// that copies overlap compute. Nothing else touches the devices. The GPUs' executors share the
// pinned staging pool, so a request staged before a GPU takes it runs on any of them.

#include <array>
#include <atomic>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/executor.h"
#include "server/request.h"

namespace dilattn::server {

struct Batch {
  Model* model = nullptr;
  std::vector<std::unique_ptr<InferenceRequest>> requests;
  // The GPU whose engine thread should run it: where its first request's tensors lie in CUDA
  // shared memory (they are then read and written in place, or copied without crossing to
  // another GPU); -1 for any. Set by Engine::Submit.
  int device = -1;
  // Runs across every GPU at once (the engine's gang runner takes it). Set by Engine::Submit.
  bool gang = false;
};

// What a device's engine thread is doing, for the time it spends on each (Engine::ThreadTimes):
// waiting for work (idle), in Executor::Start (planning, leasing and issuing a job; the CPU path
// computes there), in Executor::Wait (until the device is done), completing a job (its statistics,
// its requests handed to the completion thread), running a gang job, releasing idle memory and
// trimming the heap, and the rest (taking batches, bookkeeping). Whether the thread or the device limits throughput
// reads straight off it: a saturated thread is rarely idle or waiting.
enum class EnginePhase { kIdle, kStart, kWait, kComplete, kGang, kRelease, kOther };
inline constexpr int kEnginePhases = 7;
const char* EnginePhaseName(EnginePhase p);  // "idle", "start", ...

// Seconds one engine thread spent in each phase since the engine started.
struct EngineThreadTimes {
  std::string device;                                 // "cpu", "cpu:I" or "cuda:N"
  std::array<absl::Duration, kEnginePhases> phase{};  // by EnginePhase
  bool failed = false;  // its device showed the error that stopped the GPUs (Engine::DeviceLost)
};

// One thread's phase times. The thread moves between phases; any thread may read them, the
// current phase counted up to the moment of reading.
class PhaseClock {
 public:
  PhaseClock();
  // Ends the current phase now and starts `p`; returns the phase it ended.
  EnginePhase Enter(EnginePhase p);
  std::array<absl::Duration, kEnginePhases> Read() const;
  // The current phase and when it began.
  std::pair<EnginePhase, absl::Time> Current() const;

 private:
  mutable absl::Mutex mu_;
  EnginePhase current_ ABSL_GUARDED_BY(mu_) = EnginePhase::kOther;
  absl::Time since_ ABSL_GUARDED_BY(mu_);
  std::array<absl::Duration, kEnginePhases> total_ ABSL_GUARDED_BY(mu_){};
};

// Counts the scope's time to `p`, then returns to the phase before it.
class PhaseScope {
 public:
  PhaseScope(PhaseClock& clock, EnginePhase p) : clock_(clock), before_(clock.Enter(p)) {}
  ~PhaseScope() { clock_.Enter(before_); }
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  PhaseClock& clock_;
  const EnginePhase before_;
};

// Finishes the requests of an engine thread's finished jobs on a thread of its own, in the order
// they were added, so that the engine thread goes on to its next job at once: a request's
// completion (its response serialised and handed to gRPC, which may write it to the socket on
// the calling thread, and an output copied to system shared memory) took half of a GPU engine
// thread's time on small requests. One thread keeps the responses in the order the jobs ran (a
// job that overtook queued ones by priority is answered first).
class Completer {
 public:
  struct Item {
    std::unique_ptr<InferenceRequest> request;
    absl::Status status;  // the job's; the request's own failure or output copy may override it
    RequestTimings timings;
  };
  Completer();
  ~Completer();  // Stop()
  Completer(const Completer&) = delete;
  Completer& operator=(const Completer&) = delete;

  void Add(std::vector<Item> items);
  // Completes everything added, then ends the thread; Add() after it completes inline.
  void Stop();

 private:
  void Loop();
  static void Finish(Item& item);

  absl::Mutex mu_;
  std::deque<Item> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

struct EngineOptions {
  // "auto" (every GPU, or the CPU when there is none), "cpu", "cuda" (every GPU), "cuda:N" or
  // "cuda:N,M,..." (those GPUs).
  std::string device = "auto";
  ExecutorOptions executor;
  // Engine threads on the CPU, when the server runs there: each takes batches of its own and
  // runs them on its share of ExecutorOptions::cpu_threads, over one host pool. A small job
  // wakes few threads (a thread per 8 MFLOP), so on many cores several such jobs at once use the
  // cores one at a time leaves idle; a large job then runs on a share of the cores.
  int cpu_engines = 1;
  // Sequence parallelism: a lone sequence of at least this many tokens (fp16 or bf16, dilated
  // attention) runs split across every GPU while the other jobs wait; 0 turns it off. Needs two
  // or more GPUs and NCCL.
  int64_t sequence_parallel_min_tokens = 0;
  // A device's thread with no job frees the pool buffers cached unused this long
  // (Executor::ReleaseIdleMemory), and, when no job runs on any device, hands the C heap's free
  // pages back (memory::TrimMallocHeap); zero does neither.
  absl::Duration pool_idle_release = absl::Seconds(120);
  // A GPU job (or sequence-parallel run) the device has not finished after this long is taken
  // for a hung device: the GPUs stop as for a lost device (Engine::DeviceLost). Zero: never.
  absl::Duration gpu_job_timeout = absl::Seconds(300);
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  // An engine over the given executors, one thread each (Create's devices; tests' own), with
  // EngineOptions::pool_idle_release. `trim_heap` hands the C heap's free pages back
  // (memory::TrimMallocHeap; tests count the calls).
  static absl::StatusOr<std::unique_ptr<Engine>> CreateWith(
      std::vector<std::unique_ptr<Executor>> executors, std::unique_ptr<GangRunner> gang = nullptr,
      absl::Duration pool_idle_release = absl::ZeroDuration(),
      std::function<void()> trim_heap = nullptr,
      absl::Duration gpu_job_timeout = absl::ZeroDuration());
  ~Engine();

  std::string backend_name() const;
  int num_workers() const { return static_cast<int>(executors_.size()); }  // a thread each
  // The first GPU (-1 on the CPU): system shared memory is pinned through it (portably).
  int cuda_device() const { return executors_.front()->cuda_device(); }
  // Every pool, the executors' and the gang runner's, each once.
  std::vector<const memory::BufferPool*> pools() const;
  memory::BufferPool& staging_pool() { return executors_.front()->staging_pool(); }
  // Where each engine thread has spent its time (dilattn_engine_seconds_total), labelled by its
  // device: "cuda:N", "cpu", or "cpu:I" where several threads share the CPU. Any thread.
  std::vector<EngineThreadTimes> ThreadTimes() const;

  // The error that stopped the GPUs, naming the device it showed on; OK until then. A CUDA error
  // that corrupts a device's context (an illegal address, a kernel trap, an uncorrectable ECC
  // error, a device fallen off the bus) is, in CUDA's words, one after which the process must be
  // restarted: on two H200s, the other GPU's next allocation failed with it too. So the engine
  // stops using every GPU at once, and from then on answers each batch UNAVAILABLE, so that
  // clients retry on another replica. Any thread.
  absl::Status DeviceLost() const;
  // OK while the engine takes work; once the GPUs stopped, the UNAVAILABLE every request gets
  // (naming DeviceLost()), which handlers answer before leasing anything. Any thread.
  absl::Status Available() const;
  // Called once, on the thread that found the error, when the GPUs stop (the server then reports
  // NOT_SERVING, so that it is restarted). Any thread.
  void SetDeviceLostHandler(std::function<void(const absl::Status& error)> handler);
  // The requests a hung device holds: those of the jobs (or sequence-parallel run) of GPU threads
  // still waiting for a device past gpu_job_timeout, once the GPUs were stopped. They can never
  // be answered, and the threads holding them never return, so a shutdown cannot wait for them
  // (Server::Shutdown). 0 while no device is hung. Any thread.
  int HungRequests() const;
  // What each GPU thread's device is running, for a shutdown's log: "cuda:0: a job running for
  // 7.3s, 2 request(s)", joined by "; "; empty when no GPU runs anything. Any thread.
  std::string GpuWork() const;

  // Whether this engine can run `r`, asked of the same selector execution uses (every device's
  // executor is of one kind), and what planning it found. Any thread.
  absl::StatusOr<PlanFacts> Supports(const InferenceRequest& r) const {
    return executors_.front()->Supports(r);
  }

  // A scheduler reserves a slot before forming a batch, so batches are formed only when the
  // engine can take them and grow while it is busy. False when `deadline` passes first or the
  // engine is shutting down.
  bool AcquireSlot(absl::Time deadline);
  void ReleaseSlot();
  // Hands over a batch in a reserved slot.
  void Submit(Batch batch);

  // Runs every submitted batch, then stops the thread.
  void Shutdown();

 private:
  Engine() = default;
  // An engine thread: its executor and where its time goes.
  struct Worker {
    Executor* executor;
    PhaseClock clock;
    // When the job in flight (started, not yet waited for) was issued to the device, as unix
    // nanoseconds of MonotonicNow(); none: INT64_MAX. The watchdog reads it: a device that does
    // not finish that job holds the thread in its wait, or in the next job's start where a CUDA
    // call waits for the device.
    std::atomic<int64_t> in_flight_since{std::numeric_limits<int64_t>::max()};
    // Requests of the jobs this thread has made and not completed: the one in flight, one it is
    // starting, a sequence-parallel run's.
    std::atomic<int> held{0};
    Completer completer;  // stopped after the thread, in Shutdown()
  };
  void Loop(Worker& worker);
  // The next batch `executor` may take: the oldest with no preferred GPU, preferring its GPU, or
  // preferring a GPU no thread here runs. Null when there is none.
  std::unique_ptr<Batch> TakeFor(const Executor& executor) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool HasWorkFor(const Executor& executor) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether `executor`'s thread may run `batch` (TakeFor's rule).
  bool Eligible(const Batch& batch, const Executor& executor) const;
  // Drops cancelled and expired requests, then starts the rest; null when nothing was started.
  // Starts `batch`; a job still `in_flight` is finished first where its buffers stand in the way
  // (and moved from then).
  std::unique_ptr<Job> StartJob(Worker& worker, Batch batch, std::unique_ptr<Job>& in_flight);
  void FinishJob(Worker& worker, std::unique_ptr<Job> job);
  // After a job or gang run on `executor` failed with `s`: asks it whether its device still
  // works, and stops the GPUs when it does not.
  void CheckDevice(Executor& executor, const absl::Status& s);
  // A batch submitted or queued once the GPUs stopped: each request answered UNAVAILABLE, on the
  // calling thread.
  void Refuse(Batch batch);
  // Stops the GPUs with `error` (on `device`), once, and refuses the batches queued.
  void StopGpus(int device, const absl::Status& error);
  // The watchdog thread: stops the GPUs when a GPU thread's job in flight, or its sequence-parallel
  // run, has not finished within gpu_job_timeout_.
  void Watch();
  // How long, at `now`, the work `worker` has on its device has run (its job in flight since it
  // was issued, or its sequence-parallel run); zero when it has none. `gang`: which of the two.
  static absl::Duration BusyFor(const Worker& worker, absl::Time now, bool* gang);
  // The job of a batch's requests still wanted (not cancelled, not expired), counted in the
  // worker's `held`; null if none is.
  static std::unique_ptr<Job> MakeJob(Worker& worker, Batch batch);
  // Completes the job's requests with `s` (on the worker's completion thread), and with its
  // statistics when it is OK.
  static void CompleteJob(Worker& worker, Job& job, const absl::Status& s);
  // Runs a gang batch once no other job is running; the calling thread holds no job.
  void RunGang(Worker& worker, Batch batch);
  void JobsDone(int n);
  // Ends an idle thread's release, which freed `freed` bytes; true when the thread is to trim
  // the C heap now (and call TrimDone after).
  bool ReleaseDone(size_t freed);
  void TrimDone();

  std::vector<std::unique_ptr<Executor>> executors_;  // one per engine thread
  std::vector<std::unique_ptr<Worker>> workers_;      // one per executor, in the same order
  absl::Duration idle_release_;                       // EngineOptions::pool_idle_release
  mutable absl::Mutex mu_;
  int free_slots_ ABSL_GUARDED_BY(mu_) = 0;  // one per engine thread to begin with
  std::deque<Batch> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<GangRunner> gang_;
  // DeviceLost(); once set, no batch is queued (Submit refuses it).
  absl::Status lost_ ABSL_GUARDED_BY(mu_);
  int lost_device_ ABSL_GUARDED_BY(mu_) = -1;
  std::function<void(const absl::Status&)> on_lost_ ABSL_GUARDED_BY(mu_);
  absl::Duration gpu_job_timeout_;
  std::thread watchdog_;
  // Jobs taken from the queue and not yet finished, counted from the moment they are taken, so
  // that a gang batch can wait for every one of them; an idle thread's ReleaseIdleMemory counts.
  int jobs_running_ ABSL_GUARDED_BY(mu_) = 0;
  // A thread holds a gang batch: no thread takes another batch until it has run.
  bool gang_active_ ABSL_GUARDED_BY(mu_) = false;
  // Idle releases in progress (counted in jobs_running_ too).
  int releasing_ ABSL_GUARDED_BY(mu_) = 0;
  // A job or gang run finished, an RPC ended (memory::TakeHeapFreed) or a release freed memory
  // since the C heap was last trimmed.
  bool heap_dirty_ ABSL_GUARDED_BY(mu_) = false;
  bool trimming_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void()> trim_heap_;
  std::vector<std::thread> threads_;
};

}  // namespace dilattn::server
