#pragma once

// The assembled service: engine, models, metrics, and the gRPC server with the inference,
// health and reflection services.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server.h"
#include "server/engine.h"
#include "server/grpc/attend_service.h"
#include "server/grpc/connection_options.h"
#include "server/grpc/inference_service.h"
#include "server/grpc/tls.h"
#include "server/metrics.h"
#include "server/model_registry.h"
#include "server/shared_memory.h"

namespace dilattn::server {

struct ServerOptions {
  std::string bind_address = "0.0.0.0";
  int grpc_port = 8001;     // 0 picks a free port
  int metrics_port = 8002;  // 0 picks a free port; -1 serves no metrics
  std::string model_repository;  // empty: the built-in models
  EngineOptions engine;
  SharedMemoryOptions shared_memory;  // pin_for_device is set from the engine's device
  TlsFiles tls;                       // no certificate: plaintext gRPC
  GrpcConnectionOptions connections;  // keepalive and ping policy
  int max_message_bytes = 2147483647;
  absl::Duration grace_period = absl::Seconds(30);
  // A native stream with input still to come that sends nothing this long is ended (zero: never).
  absl::Duration stream_idle = absl::Seconds(60);
};

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options);
  ~Server();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_->port(); }  // -1: metrics off
  const ModelRegistry& registry() const { return *registry_; }
  const Engine& engine() const { return *engine_; }

  // Blocks until Shutdown() has finished.
  void Wait();
  // Health NOT_SERVING; new inference RPCs are refused (UNAVAILABLE) while those in flight,
  // streams included, finish within the grace period; then gRPC shuts down (GOAWAY), and the
  // schedulers and the engine stop. Safe from any thread, once.
  // An error when a hung GPU (Engine::HungRequests) holds requests: the drain ends once only
  // those are left, and nothing further is stopped, since gRPC's shutdown and the engine's would
  // wait for them for ever; the caller ends the process (its clients see the connection close).
  absl::Status Shutdown();
  // What a shutdown still waits for, for its log: "N RPC(s) still open", and what each GPU still
  // runs (Engine::GpuWork). Any thread.
  std::string Unfinished() const;

 private:
  Server() = default;

  ServerOptions options_;
  std::unique_ptr<SharedMemoryManager> shared_memory_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<ModelRegistry> registry_;
  ServerState state_;
  RpcGate gate_;
  std::unique_ptr<InferenceService> service_;
  std::unique_ptr<AttendService> attend_;
  std::unique_ptr<grpc::Server> grpc_;
  int grpc_port_ = 0;
  absl::Mutex mu_;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  // The GPUs stopped (Engine::DeviceLost): health and readiness stay NOT_SERVING, so that the
  // orchestrator takes the replica out of service and restarts it. Any thread.
  void DeviceFailed();
  // Written under mu_ too, where DeviceFailed (on an engine thread) may read it.
  grpc::HealthCheckServiceInterface* health_ ABSL_GUARDED_BY(mu_) = nullptr;
};

}  // namespace dilattn::server
