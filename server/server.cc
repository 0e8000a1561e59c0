#include "server/server.h"

#include <algorithm>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server_builder.h"
#include "kernels/common/clock.h"
#include "server/log.h"

namespace dilattn::server {
namespace {

// How often the TLS files are read again for a rotated certificate: a Secret's update reaches
// the pod within a minute or two, and reading a few KiB this often costs nothing.
constexpr absl::Duration kTlsRefresh = absl::Seconds(10);

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  // Before anything slow starts (a GPU's context, the models): a wrong file fails at once.
  if (absl::Status s = ValidateGrpcConnectionOptions(options.connections); !s.ok()) return s;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      GrpcServerCredentials(options.tls, kTlsRefresh);
  if (!credentials.ok()) return credentials.status();
  std::unique_ptr<Server> s(new Server());
  s->options_ = options;

  std::vector<ModelSpec> specs;
  if (options.model_repository.empty()) {
    specs = DefaultModels();
  } else {
    absl::StatusOr<std::vector<ModelSpec>> loaded = LoadModelRepository(options.model_repository);
    if (!loaded.ok()) return loaded.status();
    specs = *std::move(loaded);
  }
  // Configs written for Triton load, but a field Triton would act on must not pass silently.
  for (const ModelSpec& spec : specs) {
    if (const std::string ignored = IgnoredConfigFieldsWarning(spec.config); !ignored.empty()) {
      LogWarning("dilattn-server: %s", ignored);
    }
  }

  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(
      options.metrics_port < 0 ? ""
                               : absl::StrCat(options.bind_address, ":", options.metrics_port));
  if (!metrics.ok()) return metrics.status();
  s->metrics_ = *std::move(metrics);

  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options.engine);
  if (!engine.ok()) return engine.status();
  s->engine_ = *std::move(engine);
  s->engine_->SetDeviceLostHandler(
      [server = s.get()](const absl::Status&) { server->DeviceFailed(); });
  for (const memory::BufferPool* pool : s->engine_->pools()) s->metrics_->AddPool(pool);
  s->metrics_->SetEngineTimes([engine = s->engine_.get()] {
    std::vector<EngineThreadSeconds> out;
    for (const EngineThreadTimes& t : engine->ThreadTimes()) {
      EngineThreadSeconds& o = out.emplace_back();
      o.device = t.device;
      o.failed = t.failed;
      for (int p = 0; p < kEnginePhases; ++p) {
        o.phases.emplace_back(EnginePhaseName(static_cast<EnginePhase>(p)),
                              absl::ToDoubleSeconds(t.phase[p]));
      }
    }
    return out;
  });

  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry =
      ModelRegistry::Create(std::move(specs), s->engine_.get(), s->metrics_.get());
  if (!registry.ok()) return registry.status();
  s->registry_ = *std::move(registry);
  SharedMemoryOptions shm = options.shared_memory;
  shm.pin_for_device = s->engine_->cuda_device();
  shm.gpus_available = [engine = s->engine_.get()] { return engine->Available(); };
  s->shared_memory_ = std::make_unique<SharedMemoryManager>(shm);
  s->service_ = std::make_unique<InferenceService>(s->registry_.get(), s->shared_memory_.get(),
                                                   &s->state_, &s->gate_);
  s->attend_ = std::make_unique<AttendService>(
      s->registry_.get(), s->metrics_->streams(), &s->gate_,
      static_cast<size_t>(options.max_message_bytes), options.stream_idle);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(options.bind_address, ":", options.grpc_port), *credentials,
                           &s->grpc_port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  for (const auto& [name, value] : GrpcConnectionArgs(options.connections)) {
    builder.AddChannelArgument(name, value);
  }
  builder.RegisterService(s->service_.get());
  builder.RegisterService(s->attend_.get());
  s->grpc_ = builder.BuildAndStart();
  if (s->grpc_ == nullptr || s->grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for gRPC on ",
                                               options.bind_address, ":", options.grpc_port));
  }
  {
    absl::MutexLock lock(&s->mu_);
    s->health_ = s->grpc_->GetHealthCheckService();
    // A device may have failed already, on a request that came in before this point
    // (DeviceFailed turns `live` false under the same lock).
    const bool serving = s->state_.live.load();
    s->health_->SetServingStatus(serving);
    for (const auto& m : s->registry_->models()) s->health_->SetServingStatus(m->name(), serving);
    s->state_.ready.store(serving);
  }
  // As ServerLive and ServerReady say: live until the GPUs stop (a restart is then the cure),
  // through a shutdown's drain too, which a restart would cut short.
  s->metrics_->SetHealth([state = &s->state_] { return state->live.load(); },
                         [state = &s->state_] { return state->ready.load(); });
  const int metrics_port = s->metrics_->port();
  LogInfo("dilattn-server: backend %s, %d models, gRPC%s on %s:%d, %s", s->engine_->backend_name(),
          static_cast<int>(s->registry_->models().size()),
          options.tls.cert.empty()        ? ""
          : options.tls.client_ca.empty() ? " (TLS)"
                                          : " (mutual TLS: clients show certificates)",
          options.bind_address, s->grpc_port_,
          metrics_port < 0 ? "metrics off (--metrics-port -1)"
                           : absl::StrCat("metrics on port ", metrics_port));
  return s;
}

Server::~Server() {
  Shutdown().IgnoreError();  // a hung GPU's: the owner exits first (main.cc)
  // The engine, which owns the pools, is destroyed before the metrics (whose counters it and
  // the models update to the end), and a scrape may come in between.
  if (metrics_ != nullptr) metrics_->RemoveSources();
}

void Server::Wait() {
  if (grpc_ != nullptr) grpc_->Wait();
}

void Server::DeviceFailed() {
  LogError(
      "dilattn-server: health and readiness report NOT_SERVING from now on, so that this replica "
      "is taken out of service and restarted");
  absl::MutexLock lock(&mu_);
  state_.ready.store(false);
  state_.live.store(false);
  if (health_ != nullptr && !shut_down_) health_->SetServingStatus(false);
}

absl::Status Server::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return absl::OkStatus();
    shut_down_ = true;
    state_.ready.store(false);
    if (health_ != nullptr) health_->SetServingStatus(false);
  }
  // Schedulers stop waiting for batching delays. New inference RPCs are refused while the
  // in-flight ones finish, up to the grace period; streams among them (a native stream's later
  // stretches, a ModelStreamInfer client's next request) are still scheduled. Only then does
  // gRPC shut down (rpc_gate.h says why not at once); past the grace period it cancels what is
  // left, and the schedulers, then the engine, stop once everything they hold is done.
  const absl::Time grace_end = MonotonicNow() + options_.grace_period;
  if (registry_ != nullptr) registry_->Flush();
  const std::function<int()> hung = [this] { return engine_->HungRequests(); };
  const int running = gate_.Drain(grace_end, engine_ != nullptr ? hung : nullptr);
  if (const int held = engine_ != nullptr ? engine_->HungRequests() : 0; held > 0) {
    return absl::UnavailableError(absl::StrCat(engine_->DeviceLost().message(), "; ", held,
                                               " request(s) the hung GPU holds can never be "
                                               "answered"));
  }
  if (running > 0) {
    LogWarning("dilattn-server: %d RPC(s) still running after the grace period; cancelling them",
               running);
  }
  if (grpc_ != nullptr) {
    // gRPC takes its deadline on the wall clock.
    const absl::Duration left = std::max(grace_end - MonotonicNow(), absl::ZeroDuration());
    grpc_->Shutdown(absl::ToChronoTime(absl::Now() + left));
  }
  if (registry_ != nullptr) registry_->Shutdown();
  if (engine_ != nullptr) engine_->Shutdown();
  if (grpc_ != nullptr) LogInfo("dilattn-server: shut down");  // else it never started
  return absl::OkStatus();
}

std::string Server::Unfinished() const {
  std::string out = absl::StrCat(gate_.in_flight(), " RPC(s) still open");
  if (engine_ != nullptr) {
    if (const std::string gpu = engine_->GpuWork(); !gpu.empty()) absl::StrAppend(&out, "; ", gpu);
  }
  return out;
}

}  // namespace dilattn::server
