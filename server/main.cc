// dilattn-server: serves dilated and block-sparse attention over KServe v2 gRPC.
//
// Flags are spelled with dashes (--grpc-port), as scripts outside this repository call them;
// --flag=value and --flag value both work.

#include <csignal>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "google/protobuf/stubs/logging.h"
#include "grpc/support/log.h"
#include "kernels/memory/allocator.h"
#include "server/log.h"
#include "server/server.h"

namespace {

using dilattn::server::ServerOptions;

// How long past its grace period a shutdown may still take before the process ends without it.
// Past the grace period every call is cancelled, and what can still be running is a GPU batch,
// which cannot be interrupted: milliseconds to a few seconds, or for ever on a device that hangs
// before --gpu-job-timeout-seconds has found it out. Its clients are gone by then; ending here
// (with a log line saying what was left) beats the orchestrator's SIGKILL, which says nothing.
constexpr absl::Duration kShutdownPastGrace = absl::Seconds(5);

void GrpcLog(gpr_log_func_args* args) {
  const absl::string_view file = args->file != nullptr ? args->file : "";
  const size_t slash = file.rfind('/');
  dilattn::server::LogLine(
      args->severity == GPR_LOG_SEVERITY_ERROR ? dilattn::server::LogLevel::kError
                                               : dilattn::server::LogLevel::kInfo,
      absl::StrCat("grpc: ", args->message != nullptr ? args->message : "", " (",
                   slash == absl::string_view::npos ? file : file.substr(slash + 1), ":",
                   args->line, ")"));
}

constexpr const char* kUsage = R"(usage: dilattn-server [flags]
  --grpc-port N             gRPC port: KServe v2 inference, health, reflection (8001; 0 picks one)
  --metrics-port N          Prometheus /metrics and HTTP health (/v2/health/live, /ready) port
                            (8002; 0 picks one; -1 disables)
  --bind-address A          address both ports bind to (0.0.0.0)
  --model-repository DIR    directory of <model>/config.pbtxt (default: the built-in models)
  --device D                auto (every GPU, or the CPU without one), cpu, cuda (every GPU),
                            cuda:N or cuda:N,M,... (those GPUs) (auto)
  --device-pool-mib N       cap of each GPU's buffer pools (0: 90% of its free memory)
  --cpu-threads N           CPU backend threads (0: one per hardware thread)
  --cpu-engines N           engine threads on the CPU, each running its own batches on its
                            share of --cpu-threads: several small jobs compute at once, a large
                            one on a share of the cores (1; only when serving on the CPU)
  --host-pool-mib N         cap of the host buffer pool in MiB (16384)
  --pool-idle-release-seconds N
                            free pool buffers (host, pinned, device) cached unused this long,
                            once their device is idle, so that a burst's memory goes back to the
                            system and to other processes on the GPU (120: a workload that pauses
                            for a minute or two keeps its buffers and does not pay to allocate
                            and pin them again, yet a burst's memory is back within 3 minutes;
                            0: never)
  --grpc-server-cert FILE   serve gRPC over TLS with this certificate chain (PEM), and
  --grpc-server-key FILE    its private key (PEM); both files are read again every 10 s, so a
                            rotated certificate serves new connections without a restart
  --grpc-root-cert FILE     mutual TLS: clients must show a certificate these CAs (PEM) signed
  --grpc-keepalive-time MS  ping a connection silent this long (7200000)
  --grpc-keepalive-timeout MS
                            close a connection whose ping has no answer within this (20000)
  --grpc-keepalive-permit-without-calls 0|1
                            allow pings on connections with no call open, sent and received (0)
  --grpc-http2-max-pings-without-data N
                            pings sent with no data in between (2; 0: no limit)
  --grpc-http2-min-recv-ping-interval-without-data MS
                            a client's ping sooner than this after its last, with no data sent,
                            is a strike (300000); at least the clients' keepalive time
  --grpc-http2-max-ping-strikes N
                            strikes after which a connection is closed, "too_many_pings"
                            (2; 0: no limit)
  --log-format text|json    log records as text lines, or as one JSON object per line
                            ({"time", "severity", "message"}), gRPC's own records included (text)
  --max-message-bytes N     largest gRPC message accepted or sent (2147483647)
  --grace-period-seconds N  on SIGTERM, time in-flight requests get to finish; the process
                            ends at most 5 s after it (30)
  --gpu-job-timeout-seconds N
                            take a GPU whose job has not finished after this long for hung:
                            the server stops using its GPUs, answers UNAVAILABLE and reports
                            NOT_SERVING, so that it is restarted (300; 0: never)
  --stream-idle-seconds N   end a native stream that sends nothing this long before its input
                            is complete, or reads none of its output this long, releasing its
                            memory (60; 0: never)
  --shared-memory on|off    accept Triton's system and CUDA shared-memory regions (on)
  --pipeline-min-tokens N   run a GPU dilated-attention job of >= N tokens whose tensors are
                            copied in about eight pieces, each piece's kernel starting once its
                            inputs are in and its output copied back while later pieces compute
                            (131072; 0: off)
  --sequence-parallel-min-tokens N
                            run a lone fp16/bf16 dilated-attention sequence of >= N tokens split
                            across every GPU (NCCL), the other jobs waiting (0: off; needs >= 2
                            GPUs)
  --malloc-arenas N         cap of glibc's malloc arenas (0: glibc's default, eight per core;
                            1: the idle heap trim reaches all the free heap, at a cost in
                            throughput on many cores; the environment's MALLOC_ARENA_MAX or
                            GLIBC_TUNABLES wins) (0)
  --malloc-trim-threshold-mib N
                            free memory each of glibc's arenas may keep at its top; fixes the
                            mmap threshold at 32 MiB (0: glibc's thresholds, which rise to
                            64 MiB and 32 MiB as large blocks are freed; the environment's
                            MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES
                            wins) (8)
)";

// glibc's malloc options, applied before any thread starts.
struct MallocFlags {
  int64_t arenas = 0;
  int64_t trim_threshold_mib = 8;
};

// Parses argv into options; an error message on failure.
std::string ParseFlags(int argc, char** argv, ServerOptions* o, MallocFlags* malloc_flags,
                       bool* json_logs, bool* help) {
  int64_t host_pool_mib = 16384;
  int64_t device_pool_mib = 0;
  int64_t grace = 30;
  int64_t stream_idle = 60;
  int64_t pool_idle_release = 120;
  int64_t gpu_job_timeout = 300;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      *help = true;
      return "";
    }
    if (arg.rfind("--", 0) != 0) return absl::StrCat("unexpected argument '", arg, "'");
    std::string name = arg.substr(2);
    std::string value;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return absl::StrCat("flag --", name, " needs a value");
    }
    auto integer = [&](auto* out) {
      return absl::SimpleAtoi(value, out) ? std::string()
                                          : absl::StrCat("flag --", name, "='", value,
                                                         "' is not an integer");
    };
    std::string error;
    if (name == "grpc-port") {
      error = integer(&o->grpc_port);
    } else if (name == "metrics-port") {
      error = integer(&o->metrics_port);
    } else if (name == "bind-address") {
      o->bind_address = value;
    } else if (name == "model-repository") {
      o->model_repository = value;
    } else if (name == "device") {
      o->engine.device = value;
    } else if (name == "cpu-threads") {
      error = integer(&o->engine.executor.cpu_threads);
    } else if (name == "cpu-engines") {
      error = integer(&o->engine.cpu_engines);
    } else if (name == "device-pool-mib") {
      error = integer(&device_pool_mib);
    } else if (name == "host-pool-mib") {
      error = integer(&host_pool_mib);
    } else if (name == "max-message-bytes") {
      error = integer(&o->max_message_bytes);
    } else if (name == "grace-period-seconds") {
      error = integer(&grace);
    } else if (name == "stream-idle-seconds") {
      error = integer(&stream_idle);
    } else if (name == "pool-idle-release-seconds") {
      error = integer(&pool_idle_release);
    } else if (name == "gpu-job-timeout-seconds") {
      error = integer(&gpu_job_timeout);
    } else if (name == "pipeline-min-tokens") {
      error = integer(&o->engine.executor.pipeline_min_tokens);
    } else if (name == "sequence-parallel-min-tokens") {
      error = integer(&o->engine.sequence_parallel_min_tokens);
    } else if (name == "malloc-arenas") {
      error = integer(&malloc_flags->arenas);
    } else if (name == "malloc-trim-threshold-mib") {
      error = integer(&malloc_flags->trim_threshold_mib);
    } else if (name == "grpc-server-cert") {
      o->tls.cert = value;
    } else if (name == "grpc-server-key") {
      o->tls.key = value;
    } else if (name == "grpc-root-cert") {
      o->tls.client_ca = value;
    } else if (name == "grpc-keepalive-time") {
      error = integer(&o->connections.keepalive_time_ms);
    } else if (name == "grpc-keepalive-timeout") {
      error = integer(&o->connections.keepalive_timeout_ms);
    } else if (name == "grpc-keepalive-permit-without-calls") {
      if (value != "0" && value != "1" && value != "true" && value != "false") {
        return absl::StrCat("flag --", name, "='", value, "' is not 0, 1, true or false");
      }
      o->connections.keepalive_permit_without_calls = value == "1" || value == "true";
    } else if (name == "grpc-http2-max-pings-without-data") {
      error = integer(&o->connections.http2_max_pings_without_data);
    } else if (name == "grpc-http2-min-recv-ping-interval-without-data") {
      error = integer(&o->connections.http2_min_recv_ping_interval_without_data_ms);
    } else if (name == "grpc-http2-max-ping-strikes") {
      error = integer(&o->connections.http2_max_ping_strikes);
    } else if (name == "log-format") {
      if (value != "text" && value != "json") {
        return absl::StrCat("flag --log-format='", value, "' is not text or json");
      }
      *json_logs = value == "json";
    } else if (name == "shared-memory") {
      if (value != "on" && value != "off") {
        return absl::StrCat("flag --shared-memory='", value, "' is not on or off");
      }
      o->shared_memory.enabled = value == "on";
    } else {
      return absl::StrCat("unknown flag --", name);
    }
    if (!error.empty()) return error;
  }
  if (o->grpc_port < 0 || o->grpc_port > 65535 || o->metrics_port < -1 ||
      o->metrics_port > 65535) {
    return "ports must be in [0, 65535] (metrics: -1 disables)";
  }
  if (o->max_message_bytes < 1 || host_pool_mib < 1 || grace < 0 || stream_idle < 0 ||
      o->engine.executor.cpu_threads < 0 || device_pool_mib < 0 ||
      o->engine.sequence_parallel_min_tokens < 0 || o->engine.executor.pipeline_min_tokens < 0) {
    return "--max-message-bytes and --host-pool-mib must be >= 1; --grace-period-seconds, "
           "--stream-idle-seconds, --cpu-threads, --device-pool-mib, --pipeline-min-tokens and "
           "--sequence-parallel-min-tokens >= 0";
  }
  if (o->engine.cpu_engines < 1 || o->engine.cpu_engines > 1024) {
    return absl::StrCat("--cpu-engines must be in [1, 1024], got ", o->engine.cpu_engines);
  }
  if (malloc_flags->arenas < 0 || malloc_flags->arenas > 1024) {
    return absl::StrCat("--malloc-arenas must be in [0, 1024] (0: glibc's default), got ",
                        malloc_flags->arenas);
  }
  if (malloc_flags->trim_threshold_mib < 0 || malloc_flags->trim_threshold_mib > 1024) {
    return absl::StrCat(
        "--malloc-trim-threshold-mib must be in [0, 1024] (0: glibc's rising thresholds), got ",
        malloc_flags->trim_threshold_mib);
  }
  if (pool_idle_release < 0) {
    return absl::StrCat("--pool-idle-release-seconds must be >= 0 (0: never), got ",
                        pool_idle_release);
  }
  // A year bounds it far from absl::Duration's range.
  if (gpu_job_timeout < 0 || gpu_job_timeout > 366 * 86400) {
    return absl::StrCat("--gpu-job-timeout-seconds must be in [0, 31622400] (0: never), got ",
                        gpu_job_timeout);
  }
  // A pool past a pebibyte is a typo; the byte counts must not wrap (to a tiny pool or to 0,
  // which means "90% of free memory" for the device pool).
  constexpr int64_t kMaxPoolMib = int64_t{1} << 30;
  if (host_pool_mib > kMaxPoolMib || device_pool_mib > kMaxPoolMib) {
    return absl::StrCat("--host-pool-mib and --device-pool-mib must be at most ", kMaxPoolMib,
                        " (1 PiB)");
  }
  if (absl::Status s = dilattn::server::ValidateGrpcConnectionOptions(o->connections); !s.ok()) {
    return std::string(s.message());
  }
  o->engine.executor.host_pool_bytes = static_cast<size_t>(host_pool_mib) << 20;
  o->engine.executor.device_pool_bytes = static_cast<size_t>(device_pool_mib) << 20;
  o->grace_period = absl::Seconds(grace);
  o->stream_idle = absl::Seconds(stream_idle);
  o->engine.pool_idle_release = absl::Seconds(pool_idle_release);
  o->engine.gpu_job_timeout = absl::Seconds(gpu_job_timeout);
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  using dilattn::server::LogError;
  using dilattn::server::LogInfo;
  ServerOptions options;
  bool help = false;
  bool json_logs = false;
  MallocFlags malloc_flags;
  if (std::string error = ParseFlags(argc, argv, &options, &malloc_flags, &json_logs, &help);
      !error.empty()) {
    std::cerr << "dilattn-server: " << error << "\n" << kUsage;
    return 2;
  }
  if (help) {
    std::cout << kUsage;
    return 0;
  }
  dilattn::server::SetLogFormat(json_logs ? dilattn::server::LogFormat::kJson
                                          : dilattn::server::LogFormat::kText);
  // gRPC's own records (a failed TLS handshake, say) in the same format, so that a log collector
  // parses every line.
  gpr_set_log_function(GrpcLog);

  // Debian builds Abseil without NDEBUG, which leaves absl::Mutex's deadlock detection on: every
  // Lock of every mutex, gRPC's included, then updates one process-wide lock graph under one
  // global lock, so threads on different mutexes serialise there (2 threads each locking its own
  // mutex: 188 ns a lock against 11). Abseil's release builds leave it off. The test binaries
  // and the AddressSanitizer build keep it, so the end-to-end suite under ASan still checks the
  // server's lock order.
#if !defined(__SANITIZE_ADDRESS__)
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif

  // Before any thread starts: a thread takes its arena when it first allocates.
  LogInfo("dilattn-server: %s",
          dilattn::memory::CapMallocArenas(static_cast<int>(malloc_flags.arenas)));
  LogInfo("dilattn-server: %s",
          dilattn::memory::FixMallocThresholds(malloc_flags.trim_threshold_mib));

  // Protobuf logs a line to stderr for each message it fails to parse (a string field that is
  // not UTF-8, say): clients would write the server's log. Each such request already gets its
  // error; the lines go (FATAL still ends the process).
  google::protobuf::SetLogHandler(nullptr);

  // Block the stop signals in every thread; one thread takes them with sigwait.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  absl::StatusOr<std::unique_ptr<dilattn::server::Server>> server =
      dilattn::server::Server::Start(options);
  if (!server.ok()) {
    LogError("dilattn-server: %s", server.status().ToString());
    return 1;
  }
  // Tests and scripts read the chosen ports from this line; metrics_port=-1 when metrics are off.
  std::cout << "dilattn-server listening grpc_port=" << (*server)->grpc_port()
            << " metrics_port=" << (*server)->metrics_port() << std::endl;

  std::thread signals([&] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    LogInfo("dilattn-server: signal %d, finishing in-flight requests", signal);
    absl::Notification shut_down;
    std::thread deadline([&] {
      if (shut_down.WaitForNotificationWithTimeout(options.grace_period + kShutdownPastGrace)) {
        return;
      }
      LogError(
          "dilattn-server: still shutting down %s after the grace period (%s); exiting "
          "without waiting",
          absl::FormatDuration(kShutdownPastGrace), (*server)->Unfinished());
      std::_Exit(1);
    });
    const absl::Status s = (*server)->Shutdown();
    shut_down.Notify();
    deadline.join();
    if (!s.ok()) {
      // Nothing can wait for a hung device: not gRPC's shutdown, not the engine thread in a CUDA
      // call, not CUDA's teardown at exit. The process ends here; the driver reclaims the GPU.
      LogError("dilattn-server: %s; exiting without waiting for them", s.message());
      std::_Exit(1);
    }
  });
  (*server)->Wait();
  signals.join();
  return 0;
}
