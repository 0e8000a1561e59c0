#include "server/grpc/inference_service.h"

#include <deque>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/support/proto_buffer_writer.h"
#include "kernels/common/clock.h"
#include "server/grpc/infer_parser.h"
#include "server/grpc/wire.h"

namespace dilattn::server {
namespace {

using inference::ModelInferRequest;
using inference::ModelStreamInferResponse;

constexpr const char* kServerName = "dilattn";
constexpr const char* kServerVersion = "0.1.0";

grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* ctx, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

absl::Status SerializeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* out) {
  bool own = false;
  grpc::ByteBuffer bytes;
  grpc::Status s = grpc::GenericSerialize<grpc::ProtoBufferWriter, google::protobuf::Message>(
      message, &bytes, &own);
  if (!s.ok()) {
    return absl::InternalError(absl::StrCat("cannot serialize the response: ", s.error_message()));
  }
  out->Swap(&bytes);
  return absl::OkStatus();
}

// A unary ModelInfer: owns the message's small fields (the engine reads the tensors from the
// request's staging lease) and the response header; the output lease is appended, without a
// copy, when the engine (or the scheduler) completes the request.
class InferReactor final : public grpc::ServerUnaryReactor {
 public:
  InferReactor(grpc::ByteBuffer* out, RpcGate::Pass pass) : out_(out), pass_(std::move(pass)) {}

  inference::ModelInferRequest request;
  inference::ModelInferResponse response;
  std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);

  void Complete(const absl::Status& status) { Finish(ToGrpcStatus(status)); }
  void Complete(InferenceRequest& r, const absl::Status& status) {
    if (status.ok()) {
      const size_t bytes = r.output ? r.tensor_bytes : 0;  // 0: O is in shared memory
      *out_ = InferResponseBytes(response, std::move(r.output), bytes);
    }
    Finish(ToGrpcStatus(status));
  }
  void OnCancel() override { cancelled->store(true); }
  void OnDone() override { delete this; }

 private:
  grpc::ByteBuffer* out_;
  RpcGate::Pass pass_;
};

// ModelStreamInfer: every request read is parsed and enqueued as it arrives; responses (or
// error_message responses, as Triton sends them) are written in completion order, one write in
// flight at a time. The stream finishes once the client is done writing and every request has
// been answered.
class StreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamReactor(grpc::CallbackServerContext* ctx, ModelRegistry* registry,
                const SharedMemoryManager* shared_memory, RpcGate::Pass pass)
      : ctx_(ctx), registry_(registry), shared_memory_(shared_memory), pass_(std::move(pass)) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      bool finish;
      {
        absl::MutexLock lock(&mu_);
        reads_done_ = true;
        finish = ShouldFinishLocked();
      }
      if (finish) FinishStream();
      return;
    }
    // Counted before the next read starts: reactions run concurrently, and the stream must not
    // finish (and this reactor go) while this message is still on its way to a response.
    {
      absl::MutexLock lock(&mu_);
      ++pending_;
    }
    auto item = std::make_unique<Item>();
    const absl::Time arrival = MonotonicNow();
    absl::StatusOr<RequestBytes> raw = RequestBytes::Split(incoming_, &item->request);
    incoming_.Clear();
    // Decided once incoming_ is free again: OnWriteDone may start the paused read at once.
    bool read_next;
    {
      absl::MutexLock lock(&mu_);
      read_next = !PausedLocked();
      read_paused_ = !read_next;
    }
    if (read_next) StartRead(&incoming_);
    inference::ModelInferResponse* response = item->response.mutable_infer_response();
    absl::StatusOr<std::unique_ptr<InferenceRequest>> parsed =
        raw.ok() ? ParseInferRequest(item->request, *raw, *registry_, *shared_memory_, arrival,
                                     RpcDeadline(*ctx_), response)
                 : absl::StatusOr<std::unique_ptr<InferenceRequest>>(raw.status());
    if (!parsed.ok()) {
      SetError(item.get(), parsed.status());
      Write(item.release());
      Answered();
      return;
    }
    InferenceRequest& r = **parsed;
    r.cancelled = cancelled_;
    r.done = [this, item = item.release()](InferenceRequest& req, const absl::Status& s,
                                           const RequestTimings&) {
      if (s.ok()) {
        const size_t bytes = req.output ? req.tensor_bytes : 0;  // 0: O is in shared memory
        item->bytes = StreamResponseBytes(item->response, std::move(req.output), bytes);
      } else {
        SetError(item, s);
      }
      Write(item);
      Answered();
    };
    Model* model = r.model;
    model->scheduler().Enqueue(*std::move(parsed));
  }

  void OnWriteDone(bool) override {
    Item* next = nullptr;
    bool finish = false;
    bool resume = false;
    {
      absl::MutexLock lock(&mu_);
      delete writes_.front();
      writes_.pop_front();
      if (!writes_.empty()) {
        next = writes_.front();
      } else {
        writing_ = false;
        finish = ShouldFinishLocked();
      }
      resume = read_paused_ && !PausedLocked();
      if (resume) read_paused_ = false;
    }
    if (resume) StartRead(&incoming_);
    if (next != nullptr) {
      StartWrite(&next->bytes);
    } else if (finish) {
      FinishStream();
    }
  }

  void OnCancel() override { cancelled_->store(true); }
  void OnDone() override { delete this; }

 private:
  struct Item {
    ModelInferRequest request;
    ModelStreamInferResponse response;
    grpc::ByteBuffer bytes;  // the serialized response while it is written (empty until set)
  };

  static void SetError(Item* item, const absl::Status& s) {
    inference::ModelInferResponse* r = item->response.mutable_infer_response();
    const std::string model = item->request.model_name();
    r->Clear();
    r->set_model_name(model);
    r->set_model_version(item->request.model_version());
    r->set_id(item->request.id());
    item->response.set_error_message(std::string(s.message()));
  }

  void Write(Item* item) {
    if (item->bytes.Length() == 0) {  // an error response: no output to append
      if (absl::Status s = SerializeMessage(item->response, &item->bytes); !s.ok()) {
        SetError(item, s);
        (void)SerializeMessage(item->response, &item->bytes);
      }
    }
    bool start;
    {
      absl::MutexLock lock(&mu_);
      writes_.push_back(item);
      start = !writing_;
      writing_ = true;
    }
    if (start) StartWrite(&item->bytes);
  }

  // A message's response is queued for writing: it no longer holds the stream open.
  void Answered() {
    bool finish;
    {
      absl::MutexLock lock(&mu_);
      --pending_;
      finish = ShouldFinishLocked();
    }
    if (finish) FinishStream();
  }

  // A client that sends requests but does not read their responses would have every output it
  // asked for held in the host pool: past kMaxOutstanding requests read and not yet written
  // back, the stream reads no more until a write completes.
  static constexpr size_t kMaxOutstanding = 16;
  bool PausedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return static_cast<size_t>(pending_) + writes_.size() >= kMaxOutstanding;
  }

  bool ShouldFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!reads_done_ || pending_ > 0 || writing_ || finished_) return false;
    finished_ = true;
    return true;
  }

  void FinishStream() {
    Finish(cancelled_->load() ? grpc::Status::CANCELLED : grpc::Status::OK);
  }

  grpc::CallbackServerContext* ctx_;
  ModelRegistry* registry_;
  const SharedMemoryManager* shared_memory_;
  RpcGate::Pass pass_;
  grpc::ByteBuffer incoming_;
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
  absl::Mutex mu_;
  std::deque<Item*> writes_ ABSL_GUARDED_BY(mu_);  // front is being written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int64_t pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool read_paused_ ABSL_GUARDED_BY(mu_) = false;  // PausedLocked held the next read back
};

void TensorMetadata(const inference::ModelInput& in, bool batched,
                    inference::ModelMetadataResponse::TensorMetadata* out) {
  out->set_name(in.name());
  const std::string type = inference::DataType_Name(in.data_type());
  out->set_datatype(type.substr(5));  // TYPE_FP32 -> FP32
  if (batched) out->add_shape(-1);
  for (int64_t d : in.dims()) out->add_shape(d);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Time RpcDeadline(const grpc::CallbackServerContext& ctx) {
  const auto deadline = ctx.deadline();
  // gRPC reports "no deadline" as a time point centuries away.
  if (deadline >= std::chrono::system_clock::now() + std::chrono::hours(24 * 365 * 100)) {
    return absl::InfiniteFuture();
  }
  return MonotonicFromWall(absl::FromChrono(deadline));
}

grpc::ServerUnaryReactor* InferenceService::ServerLive(grpc::CallbackServerContext* ctx,
                                                       const inference::ServerLiveRequest*,
                                                       inference::ServerLiveResponse* resp) {
  resp->set_live(state_->live.load());
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ServerReady(grpc::CallbackServerContext* ctx,
                                                        const inference::ServerReadyRequest*,
                                                        inference::ServerReadyResponse* resp) {
  resp->set_ready(state_->ready.load());
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelReady(grpc::CallbackServerContext* ctx,
                                                       const inference::ModelReadyRequest* req,
                                                       inference::ModelReadyResponse* resp) {
  absl::StatusOr<Model*> model = registry_->Find(req->name(), req->version());
  if (!model.ok()) return Reply(ctx, model.status());
  resp->set_ready(state_->ready.load());
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ServerMetadata(
    grpc::CallbackServerContext* ctx, const inference::ServerMetadataRequest*,
    inference::ServerMetadataResponse* resp) {
  resp->set_name(kServerName);
  resp->set_version(kServerVersion);
  for (const char* e : {"model_configuration", "schedule_policy", "parameters", "statistics",
                        "binary_tensor_data"}) {
    resp->add_extensions(e);
  }
  if (shared_memory_->enabled()) {
    resp->add_extensions("system_shared_memory");
    resp->add_extensions("cuda_shared_memory");
  }
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelMetadata(
    grpc::CallbackServerContext* ctx, const inference::ModelMetadataRequest* req,
    inference::ModelMetadataResponse* resp) {
  absl::StatusOr<Model*> model = registry_->Find(req->name(), req->version());
  if (!model.ok()) return Reply(ctx, model.status());
  const ModelSpec& spec = (*model)->spec();
  resp->set_name(spec.name);
  resp->add_versions(spec.version);
  resp->set_platform("dilattn");
  const bool batched = spec.config.max_batch_size() > 0;
  for (const auto& in : spec.config.input()) TensorMetadata(in, batched, resp->add_inputs());
  for (const auto& out : spec.config.output()) {
    inference::ModelInput as_input;
    as_input.set_name(out.name());
    as_input.set_data_type(out.data_type());
    *as_input.mutable_dims() = out.dims();
    TensorMetadata(as_input, batched, resp->add_outputs());
  }
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelConfig(grpc::CallbackServerContext* ctx,
                                                        const inference::ModelConfigRequest* req,
                                                        inference::ModelConfigResponse* resp) {
  absl::StatusOr<Model*> model = registry_->Find(req->name(), req->version());
  if (!model.ok()) return Reply(ctx, model.status());
  *resp->mutable_config() = (*model)->spec().config;
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelStatistics(
    grpc::CallbackServerContext* ctx, const inference::ModelStatisticsRequest* req,
    inference::ModelStatisticsResponse* resp) {
  if (!req->name().empty()) {
    absl::StatusOr<Model*> model = registry_->Find(req->name(), req->version());
    if (!model.ok()) return Reply(ctx, model.status());
  }
  for (const auto& m : registry_->models()) {
    if (!req->name().empty() && m->name() != req->name()) continue;
    inference::ModelStatistics* s = resp->add_model_stats();
    s->set_name(m->name());
    s->set_version(m->spec().version);
    m->stats().Fill(s);
  }
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::RepositoryIndex(
    grpc::CallbackServerContext* ctx, const inference::RepositoryIndexRequest*,
    inference::RepositoryIndexResponse* resp) {
  for (const auto& m : registry_->models()) {
    auto* index = resp->add_models();
    index->set_name(m->name());
    index->set_version(m->spec().version);
    index->set_state(state_->ready.load() ? "READY" : "UNAVAILABLE");
  }
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::SystemSharedMemoryStatus(
    grpc::CallbackServerContext* ctx, const inference::SystemSharedMemoryStatusRequest* req,
    inference::SystemSharedMemoryStatusResponse* resp) {
  absl::StatusOr<std::vector<SharedMemoryRegion::Info>> regions =
      shared_memory_->Status(RegionKind::kSystem, req->name());
  if (!regions.ok()) return Reply(ctx, regions.status());
  for (const SharedMemoryRegion::Info& info : *regions) {
    auto& status = (*resp->mutable_regions())[info.name];
    status.set_name(info.name);
    status.set_key(info.key);
    status.set_offset(info.offset);
    status.set_byte_size(info.byte_size);
  }
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::SystemSharedMemoryRegister(
    grpc::CallbackServerContext* ctx, const inference::SystemSharedMemoryRegisterRequest* req,
    inference::SystemSharedMemoryRegisterResponse*) {
  return Reply(ctx, shared_memory_->RegisterSystem(req->name(), req->key(), req->offset(),
                                                   req->byte_size()));
}

grpc::ServerUnaryReactor* InferenceService::SystemSharedMemoryUnregister(
    grpc::CallbackServerContext* ctx, const inference::SystemSharedMemoryUnregisterRequest* req,
    inference::SystemSharedMemoryUnregisterResponse*) {
  return Reply(ctx, shared_memory_->Unregister(RegionKind::kSystem, req->name()));
}

grpc::ServerUnaryReactor* InferenceService::CudaSharedMemoryStatus(
    grpc::CallbackServerContext* ctx, const inference::CudaSharedMemoryStatusRequest* req,
    inference::CudaSharedMemoryStatusResponse* resp) {
  absl::StatusOr<std::vector<SharedMemoryRegion::Info>> regions =
      shared_memory_->Status(RegionKind::kCuda, req->name());
  if (!regions.ok()) return Reply(ctx, regions.status());
  for (const SharedMemoryRegion::Info& info : *regions) {
    auto& status = (*resp->mutable_regions())[info.name];
    status.set_name(info.name);
    status.set_device_id(static_cast<uint64_t>(info.device));
    status.set_byte_size(info.byte_size);
  }
  return Reply(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::CudaSharedMemoryRegister(
    grpc::CallbackServerContext* ctx, const inference::CudaSharedMemoryRegisterRequest* req,
    inference::CudaSharedMemoryRegisterResponse*) {
  return Reply(ctx, shared_memory_->RegisterCuda(req->name(), req->raw_handle(),
                                                 req->device_id(), req->byte_size()));
}

grpc::ServerUnaryReactor* InferenceService::CudaSharedMemoryUnregister(
    grpc::CallbackServerContext* ctx, const inference::CudaSharedMemoryUnregisterRequest* req,
    inference::CudaSharedMemoryUnregisterResponse*) {
  return Reply(ctx, shared_memory_->Unregister(RegionKind::kCuda, req->name()));
}

grpc::ServerUnaryReactor* InferenceService::ModelInfer(grpc::CallbackServerContext* ctx,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* response) {
  const absl::Time arrival = MonotonicNow();
  absl::StatusOr<RpcGate::Pass> pass = gate_->Enter();
  if (!pass.ok()) {
    auto* refused = new InferReactor(response, RpcGate::Pass());
    refused->Complete(pass.status());
    return refused;
  }
  auto* reactor = new InferReactor(response, *std::move(pass));
  absl::StatusOr<RequestBytes> raw = RequestBytes::Split(*request, &reactor->request);
  if (!raw.ok()) {
    reactor->Complete(raw.status());
    return reactor;
  }
  absl::StatusOr<std::unique_ptr<InferenceRequest>> parsed =
      ParseInferRequest(reactor->request, *raw, *registry_, *shared_memory_, arrival,
                        RpcDeadline(*ctx), &reactor->response);
  if (!parsed.ok()) {
    reactor->Complete(parsed.status());
    return reactor;
  }
  InferenceRequest& r = **parsed;
  r.cancelled = reactor->cancelled;
  r.done = [reactor](InferenceRequest& req, const absl::Status& s, const RequestTimings&) {
    reactor->Complete(req, s);
  };
  Model* model = r.model;
  model->scheduler().Enqueue(*std::move(parsed));
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* InferenceService::ModelStreamInfer(
    grpc::CallbackServerContext* ctx) {
  absl::StatusOr<RpcGate::Pass> pass = gate_->Enter();
  if (!pass.ok()) return new RefusedStream(ToGrpcStatus(pass.status()));
  return new StreamReactor(ctx, registry_, shared_memory_, *std::move(pass));
}

}  // namespace dilattn::server
