#pragma once

// inference.GRPCInferenceService on gRPC's callback API. Handlers parse, validate and enqueue;
// they never wait for a result: the engine thread completes the RPC when the request is done.

#include <atomic>
#include <string>

#include "inference/grpc_service.grpc.pb.h"
#include "server/engine.h"
#include "server/grpc/rpc_gate.h"
#include "server/model_registry.h"
#include "server/shared_memory.h"

namespace dilattn::server {

struct ServerState {
  std::atomic<bool> ready{false};
  // False once the GPUs stopped after a device error: only a restart cures that.
  std::atomic<bool> live{true};
};

// ModelInfer and ModelStreamInfer take raw bytes and parse them here, so that a malformed or
// truncated message is answered INVALID_ARGUMENT with a reason (gRPC's own parse failure answers
// UNIMPLEMENTED without one).
namespace internal {
using G = inference::GRPCInferenceService;
// Every other method on the callback API (the unimplemented ones answer UNIMPLEMENTED).
using CallbackMethods =
    G::WithCallbackMethod_ServerLive<G::WithCallbackMethod_ServerReady<G::WithCallbackMethod_ModelReady<G::WithCallbackMethod_ServerMetadata<G::WithCallbackMethod_ModelMetadata<G::WithCallbackMethod_ModelConfig<G::WithCallbackMethod_ModelStatistics<G::WithCallbackMethod_RepositoryIndex<G::WithCallbackMethod_RepositoryModelLoad<G::WithCallbackMethod_RepositoryModelUnload<G::WithCallbackMethod_SystemSharedMemoryStatus<G::WithCallbackMethod_SystemSharedMemoryRegister<G::WithCallbackMethod_SystemSharedMemoryUnregister<G::WithCallbackMethod_CudaSharedMemoryStatus<G::WithCallbackMethod_CudaSharedMemoryRegister<G::WithCallbackMethod_CudaSharedMemoryUnregister<G::WithCallbackMethod_TraceSetting<G::WithCallbackMethod_LogSettings<G::Service>>>>>>>>>>>>>>>>>>;
}  // namespace internal
using InferenceServiceBase = inference::GRPCInferenceService::WithRawCallbackMethod_ModelInfer<
    inference::GRPCInferenceService::WithRawCallbackMethod_ModelStreamInfer<
        internal::CallbackMethods>>;

class InferenceService final : public InferenceServiceBase {
 public:
  // ModelInfer and ModelStreamInfer take a pass from `gate` for their lifetime.
  InferenceService(ModelRegistry* registry, SharedMemoryManager* shared_memory, ServerState* state,
                   RpcGate* gate)
      : registry_(registry), shared_memory_(shared_memory), state_(state), gate_(gate) {}

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* ctx,
                                       const inference::ServerLiveRequest* req,
                                       inference::ServerLiveResponse* resp) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* ctx,
                                        const inference::ServerReadyRequest* req,
                                        inference::ServerReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* ctx,
                                       const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* ctx,
                                           const inference::ServerMetadataRequest* req,
                                           inference::ServerMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* ctx,
                                          const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* ctx,
                                        const inference::ModelConfigRequest* req,
                                        inference::ModelConfigResponse* resp) override;
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* ctx,
                                            const inference::ModelStatisticsRequest* req,
                                            inference::ModelStatisticsResponse* resp) override;
  grpc::ServerUnaryReactor* RepositoryIndex(grpc::CallbackServerContext* ctx,
                                            const inference::RepositoryIndexRequest* req,
                                            inference::RepositoryIndexResponse* resp) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryStatus(
      grpc::CallbackServerContext* ctx, const inference::SystemSharedMemoryStatusRequest* req,
      inference::SystemSharedMemoryStatusResponse* resp) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryRegister(
      grpc::CallbackServerContext* ctx, const inference::SystemSharedMemoryRegisterRequest* req,
      inference::SystemSharedMemoryRegisterResponse* resp) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryUnregister(
      grpc::CallbackServerContext* ctx, const inference::SystemSharedMemoryUnregisterRequest* req,
      inference::SystemSharedMemoryUnregisterResponse* resp) override;
  grpc::ServerUnaryReactor* CudaSharedMemoryStatus(
      grpc::CallbackServerContext* ctx, const inference::CudaSharedMemoryStatusRequest* req,
      inference::CudaSharedMemoryStatusResponse* resp) override;
  grpc::ServerUnaryReactor* CudaSharedMemoryRegister(
      grpc::CallbackServerContext* ctx, const inference::CudaSharedMemoryRegisterRequest* req,
      inference::CudaSharedMemoryRegisterResponse* resp) override;
  grpc::ServerUnaryReactor* CudaSharedMemoryUnregister(
      grpc::CallbackServerContext* ctx, const inference::CudaSharedMemoryUnregisterRequest* req,
      inference::CudaSharedMemoryUnregisterResponse* resp) override;
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* ctx,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ModelStreamInfer(
      grpc::CallbackServerContext* ctx) override;

  ModelRegistry& registry() { return *registry_; }

 private:
  ModelRegistry* registry_;
  SharedMemoryManager* shared_memory_;
  ServerState* state_;
  RpcGate* gate_;
};

grpc::Status ToGrpcStatus(const absl::Status& status);

// The RPC's deadline as an absl::Time on the monotonic scale (kernels/common/clock.h;
// InfiniteFuture when the client set none).
absl::Time RpcDeadline(const grpc::CallbackServerContext& ctx);

}  // namespace dilattn::server
