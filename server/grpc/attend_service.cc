#include "server/grpc/attend_service.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/common/clock.h"
#include "kernels/common/quote.h"
#include "server/grpc/infer_parser.h"
#include "server/grpc/inference_service.h"
#include "server/grpc/wire.h"
#include "server/model.h"
#include "server/request.h"

namespace dilattn::server {
namespace {

namespace v1 = ::dilattn::v1;

absl::Status Invalid(absl::string_view message) { return absl::InvalidArgumentError(message); }

// Everything the header fixes for the stream's requests.
struct Problem {
  Model* model = nullptr;
  std::string id;
  OperatorOptions options;
  attention::DType dtype = attention::DType::kFloat32;
  int64_t batch = 0, seq_len = 0, heads = 0, head_dim = 0;
  int priority = 1;
  // Each stretch's time in the queue, counted from when its input is complete (RequestTimeout).
  absl::Duration timeout = absl::InfiniteDuration();
  size_t token_bytes = 0;   // one token of one tensor: H * D elements
  size_t tensor_bytes = 0;  // B * N tokens
  int64_t stretch = 0;      // tokens per stretch
  // Block-sparse: the kept block pairs of a stretch (the batcher caps their sum), of a whole
  // one and of the sequence's shorter last one.
  int64_t stretch_pairs = 0, last_stretch_pairs = 0;
};

// A request of the model for tokens [first, first + len) of one sequence, with no data yet.
std::unique_ptr<InferenceRequest> StretchRequest(const Problem& p, int64_t len) {
  auto r = std::make_unique<InferenceRequest>();
  r->model = p.model;
  r->id = p.id;
  r->options = p.options;
  r->dtype = p.dtype;
  r->batch = 1;
  r->seq_len = len;
  r->heads = p.heads;
  r->head_dim = p.head_dim;
  r->tensor_bytes = static_cast<size_t>(len) * p.token_bytes;
  r->priority = p.priority;
  r->kept_pairs = len == p.stretch ? p.stretch_pairs : p.last_stretch_pairs;
  r->batch_key = BatchKey(*r);
  return r;
}

// `model`: the served model the header names.
absl::StatusOr<Problem> ParseHeader(const v1::Header& h, Model* model) {
  Problem p;
  p.model = model;
  const ModelSpec& spec = p.model->spec();
  if (spec.hidden_states()) {
    return Invalid(absl::StrCat("model '", spec.name,
                                "' takes hidden states X; this stream carries Q, K and V: send X "
                                "through ModelInfer or ModelStreamInfer"));
  }
  p.id = h.id();
  p.options = spec.defaults;
  switch (h.datatype()) {
    case v1::FP32:
      p.dtype = attention::DType::kFloat32;
      break;
    case v1::FP16:
      p.dtype = attention::DType::kFloat16;
      break;
    case v1::BF16:
      p.dtype = attention::DType::kBFloat16;
      break;
    default:
      return Invalid(absl::StrCat("header: datatype ", static_cast<int>(h.datatype()), " (",
                                  v1::DataType_Name(h.datatype()), ") is not FP32, FP16 or BF16"));
  }
  const std::string shape_text = ShapeText(h.shape());
  if (h.shape_size() != 4) {
    return Invalid(absl::StrCat("header: shape ", shape_text, " has ", h.shape_size(),
                                " dims; expected [B, N, H, D]"));
  }
  if (absl::Status s = CheckDims(spec, h.shape(), "header"); !s.ok()) return s;
  p.batch = h.shape(0);
  p.seq_len = h.shape(1);
  p.heads = h.shape(2);
  p.head_dim = h.shape(3);
  // Four tensors (Q, K, V and O) share one lease: their bytes together must not overflow.
  int64_t token = static_cast<int64_t>(attention::DTypeSize(p.dtype));
  int64_t four = 0;
  if (__builtin_mul_overflow(token, p.heads, &token) ||
      __builtin_mul_overflow(token, p.head_dim, &token) ||
      __builtin_mul_overflow(token, p.batch, &four) ||
      __builtin_mul_overflow(four, p.seq_len, &four) ||
      __builtin_mul_overflow(four, int64_t{4}, &four)) {
    return Invalid(absl::StrCat("header: shape ", shape_text, " overflows a byte count"));
  }
  p.token_bytes = static_cast<size_t>(token);
  p.tensor_bytes = static_cast<size_t>(four / 4);
  p.priority = PriorityLevel(spec, h.priority());
  if (h.timeout_microseconds() < 0) {
    return Invalid(absl::StrCat("header: timeout_microseconds ", h.timeout_microseconds(),
                                " must be >= 0 (0: the model's default timeout)"));
  }
  p.timeout = RequestTimeout(spec, h.timeout_microseconds());
  for (const auto& [key, value] : h.parameters()) {
    // KServe's scheduling parameters have fields of their own here: say so rather than list the
    // operator's parameters.
    if (key == "priority" || key == "timeout") {
      return Invalid(absl::StrCat(
          "header parameter ", Quote(key), " is not an operator parameter: set the header's ",
          key == "priority" ? "priority" : "timeout_microseconds", " field"));
    }
    if (absl::Status s =
            ApplyOperatorParameter(key, ParamValue(value), "header parameter", &p.options);
        !s.ok()) {
      return s;
    }
  }
  p.stretch = StretchTokens(p.options, p.seq_len);
  // The operator's validation and the engine's support check on every stretch length the
  // stream will send, so that nothing accepted now is refused later.
  for (int64_t len : {p.stretch, p.seq_len % p.stretch}) {
    if (len == 0) continue;
    absl::StatusOr<PlanFacts> facts = p.model->engine().Supports(*StretchRequest(p, len));
    if (!facts.ok()) return facts.status();
    (len == p.stretch ? p.stretch_pairs : p.last_stretch_pairs) = facts->kept_pairs;
  }
  return p;
}

}  // namespace

namespace internal {

absl::Status CheckAttendHeader(const v1::Header& header, const ModelRegistry& registry) {
  absl::StatusOr<Model*> model = registry.Find(header.model(), "");
  if (!model.ok()) return model.status();
  return ParseHeader(header, *model).status();
}

absl::StatusOr<std::vector<std::unique_ptr<InferenceRequest>>> AttendStretchRequests(
    const v1::Header& header, const ModelRegistry& registry) {
  absl::StatusOr<Model*> model = registry.Find(header.model(), "");
  if (!model.ok()) return model.status();
  absl::StatusOr<Problem> p = ParseHeader(header, *model);
  if (!p.ok()) return p.status();
  std::vector<std::unique_ptr<InferenceRequest>> out;
  out.push_back(StretchRequest(*p, p->stretch));
  if (p->seq_len % p->stretch != 0) out.push_back(StretchRequest(*p, p->seq_len % p->stretch));
  return out;
}

class AttendReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  AttendReactor(grpc::CallbackServerContext* ctx, AttendService* service, ModelRegistry* registry,
                size_t chunk_bytes, RpcGate::Pass pass)
      : ctx_(ctx),
        service_(service),
        registry_(registry),
        chunk_bytes_(chunk_bytes),
        pass_(std::move(pass)) {
    service_->Register(this);
    StartRead(&incoming_);
  }
  ~AttendReactor() override { service_->Unregister(this); }

  // For the idle watchdog: true when the stream still waits for input and has received nothing
  // since `cutoff`, or has had an output message unread by the client since then, and a
  // reference was taken (the caller then calls AbortIdle).
  bool RefIfIdleSince(absl::Time cutoff) {
    absl::MutexLock lock(&mu_);
    if (refs_ == 0 || finished_ || !IdleLocked(cutoff)) return false;
    ++refs_;
    return true;
  }

  void AbortIdle(absl::Duration idle) {
    bool write_stalled = false;
    {
      absl::MutexLock lock(&mu_);
      write_stalled = writing_;
      FailLocked(absl::DeadlineExceededError(absl::StrCat(
          write_stalled ? "the client read no output for " : "the stream sent nothing for ",
          absl::FormatDuration(idle), write_stalled ? "" : " before its input was complete",
          " (--stream-idle-seconds); its memory is released")));
    }
    // A write that the client does not read never completes, and the stream finishes only after
    // it: cancelling the call completes it.
    if (write_stalled) ctx_->TryCancel();
    Progress();
    Unref();
  }

  void OnReadDone(bool ok) override {
    absl::Status status;
    bool read_more = false;
    std::vector<std::unique_ptr<InferenceRequest>> ready;
    {
      absl::MutexLock lock(&mu_);
      in_read_ = true;  // no Finish until this reaction has decided on its next read
      last_read_ = MonotonicNow();
    }
    if (ok) {
      absl::StatusOr<AttendBytes> message = AttendBytes::Parse(incoming_);
      status = !message.ok()          ? message.status()
               : message->has_header() ? OnHeader(message->header())
               : message->has_chunk()  ? OnChunk(*message, &ready)
                                       : Invalid("a message with neither header nor chunk");
      incoming_.Clear();
    }
    {
      absl::MutexLock lock(&mu_);
      if (!ok) {
        reads_done_ = true;
        if (error_.ok() && !cancelled_->load()) {
          if (!header_seen_) {
            error_ = Invalid("the stream ended before its header");
          } else if (const int64_t least = *std::min_element(arrived_, arrived_ + 3);
                     least < total_tokens_) {
            error_ = Invalid(absl::StrCat("the stream ended after tokens Q ", arrived_[0], ", K ",
                                          arrived_[1], ", V ", arrived_[2], " of ", total_tokens_));
          }
        }
      } else if (!status.ok()) {
        FailLocked(status);
      } else {
        outstanding_ += static_cast<int64_t>(ready.size());
        read_more = error_.ok();
      }
    }
    // A rejection completes the request (and takes mu_) on this thread.
    for (auto& r : ready) {
      Model* model = r->model;
      model->scheduler().Enqueue(std::move(r));
    }
    {
      absl::MutexLock lock(&mu_);
      read_more = read_more && error_.ok();
      in_read_ = false;
    }
    if (read_more) StartRead(&incoming_);
    Progress();
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) FailLocked(absl::CancelledError("the client stopped reading the output"));
    }
    Progress();
  }

  void OnCancel() override {
    cancelled_->store(true);
    {
      absl::MutexLock lock(&mu_);
      FailLocked(absl::CancelledError("stream cancelled"));
    }
    Progress();
  }

  void OnDone() override { Unref(); }

 private:
  absl::Status OnHeader(const v1::Header& header) {
    {
      absl::MutexLock lock(&mu_);
      if (header_seen_) return Invalid("a second header; one stream carries one problem");
    }
    const absl::Time arrival = MonotonicNow();
    absl::StatusOr<Model*> model = registry_->Find(header.model(), "");
    if (!model.ok()) return model.status();
    absl::StatusOr<Problem> p = ParseHeader(header, *model);
    if (!p.ok()) {
      // A refused header is one failed request of the model it names.
      CountRefusedRequest(*model, arrival, p.status());
      return p.status();
    }
    // Once the GPUs stopped, their pinned pool cannot grow: refused as every request then is.
    if (absl::Status s = p->model->engine().Available(); !s.ok()) {
      CountRefusedRequest(p->model, arrival, s);
      return s;
    }
    absl::StatusOr<memory::Buffer> lease =
        p->model->engine().staging_pool().Acquire(4 * p->tensor_bytes);
    if (!lease.ok()) {
      absl::Status refused = absl::ResourceExhaustedError(absl::StrCat(
          "Q, K, V and O of shape [", p->batch, ",", p->seq_len, ",", p->heads, ",", p->head_dim,
          "] need ", 4 * p->tensor_bytes, " bytes of staging memory: ", lease.status().message()));
      CountRefusedRequest(p->model, arrival, refused);
      return refused;
    }
    absl::MutexLock lock(&mu_);
    problem_ = *std::move(p);
    lease_ = std::make_shared<memory::Buffer>(*std::move(lease));
    header_seen_ = true;
    total_tokens_ = problem_.batch * problem_.seq_len;
    chunk_tokens_ = std::max<int64_t>(1, static_cast<int64_t>(chunk_bytes_ / problem_.token_bytes));
    rpc_deadline_ = RpcDeadline(*ctx_);
    accepted_pending_ = true;
    return absl::OkStatus();
  }

  absl::Status OnChunk(const AttendBytes& chunk,
                       std::vector<std::unique_ptr<InferenceRequest>>* ready) {
    const int64_t t = static_cast<int64_t>(chunk.tensor()) - 1;
    const size_t bytes = chunk.data_size();
    int64_t tokens = 0;
    std::byte* dst = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (!header_seen_) return Invalid("a chunk before the header");
      if (t < 0 || t > 2) {
        return Invalid(
            absl::StrCat("chunk: tensor ", static_cast<int>(chunk.tensor()), " is not Q, K or V"));
      }
      // The message is built only for a bad chunk, not for every good one.
      auto bad = [&](const auto&... why) {
        static constexpr char kNames[] = "QKV";
        return Invalid(absl::StrCat("chunk of ", absl::string_view(&kNames[t], 1), " at token ",
                                    chunk.token(), ": ", why...));
      };
      if (chunk.token() != arrived_[t]) {
        return bad("expected token ", arrived_[t],
                   " (each tensor's chunks come in order, without gaps)");
      }
      if (bytes == 0 || bytes % problem_.token_bytes != 0) {
        return bad(bytes, " bytes is not a positive whole number of tokens of ",
                   problem_.token_bytes, " bytes");
      }
      tokens = static_cast<int64_t>(bytes / problem_.token_bytes);
      if (tokens > total_tokens_ - arrived_[t]) {
        return bad(tokens, " tokens run past the ", total_tokens_, " of the header's shape");
      }
      dst = Tensor(t) + static_cast<size_t>(arrived_[t]) * problem_.token_bytes;
    }
    // Outside the lock: completions on the engine thread need it, and nothing else writes
    // these bytes (reads are handled one at a time) or reads them before they are published.
    chunk.CopyData(dst);  // from gRPC's receive buffers, the one copy
    service_->metrics_->bytes_in->Increment(static_cast<double>(bytes));
    absl::MutexLock lock(&mu_);
    arrived_[t] += tokens;
    // Every stretch whose tokens have now all arrived becomes a request.
    const int64_t have = *std::min_element(arrived_, arrived_ + 3);
    while (next_stretch_ < total_tokens_) {
      const int64_t in_seq = next_stretch_ % problem_.seq_len;
      const int64_t len = std::min(problem_.stretch, problem_.seq_len - in_seq);
      if (next_stretch_ + len > have) break;
      ready->push_back(MakeRequestLocked(next_stretch_, len));
      next_stretch_ += len;
    }
    return absl::OkStatus();
  }

  std::byte* Tensor(int t) {
    return static_cast<std::byte*>(lease_->data()) + static_cast<size_t>(t) * problem_.tensor_bytes;
  }

  std::unique_ptr<InferenceRequest> MakeRequestLocked(int64_t first, int64_t len)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::unique_ptr<InferenceRequest> r = StretchRequest(problem_, len);
    const size_t at = static_cast<size_t>(first) * problem_.token_bytes;
    absl::string_view* views[3] = {&r->q, &r->k, &r->v};
    for (int i = 0; i < 3; ++i) {
      *views[i] = absl::string_view(reinterpret_cast<const char*>(Tensor(i) + at), r->tensor_bytes);
    }
    r->output_target = {Tensor(3) + at, -1};
    // A stretch arrives when its input is complete: like a KServe request, it has the timeout
    // from then on, within the call's deadline.
    r->arrival = MonotonicNow();
    r->deadline = std::min(rpc_deadline_, r->arrival + problem_.timeout);
    r->cancelled = cancelled_;
    ++refs_;  // the request's completion may run after gRPC is done with the stream
    r->done = [this, first, len](InferenceRequest&, const absl::Status& s, const RequestTimings&) {
      {
        absl::MutexLock lock(&mu_);
        --outstanding_;
        if (s.ok()) {
          computed_[first] = first + len;
          for (auto it = computed_.find(computed_until_); it != computed_.end();
               it = computed_.find(computed_until_)) {
            computed_until_ = it->second;
            computed_.erase(it);
          }
        } else {
          FailLocked(s);
        }
      }
      Progress();
      Unref();
    };
    return r;
  }

  void Unref() {
    bool last;
    {
      absl::MutexLock lock(&mu_);
      last = --refs_ == 0;
    }
    if (last) delete this;
  }

  bool IdleLocked(absl::Time cutoff) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ && write_started_ < cutoff) return true;
    if (!error_.ok() || reads_done_ || last_read_ >= cutoff) return false;
    return !header_seen_ || *std::min_element(arrived_, arrived_ + 3) < total_tokens_;
  }

  // The first error ends the stream once nothing of it is in flight; the stretches still queued
  // are dropped uncomputed.
  void FailLocked(const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (error_.ok()) error_ = s;
    cancelled_->store(true);
  }

  // Starts the next write or finishes the stream, whichever is due.
  void Progress() {
    enum { kNothing, kWrite, kFinish } action = kNothing;
    grpc::Status final_status;
    int64_t output_token = -1;  // the output chunk to frame, outside the lock
    size_t output_offset = 0, output_bytes = 0;
    std::string accepted;  // the serialized Accepted message, when that is the one due
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || writing_) return;
      if (error_.ok() && accepted_pending_) {
        v1::AttendResponse message;
        message.mutable_accepted()->set_stretch_tokens(problem_.stretch);
        message.mutable_accepted()->set_max_chunk_bytes(chunk_tokens_ *
                                                        static_cast<int64_t>(problem_.token_bytes));
        accepted = message.SerializeAsString();
        accepted_pending_ = false;
        action = kWrite;
      } else if (error_.ok() && sent_until_ < computed_until_) {
        const int64_t n = std::min(chunk_tokens_, computed_until_ - sent_until_);
        output_token = sent_until_;
        output_offset = 3 * problem_.tensor_bytes +
                        static_cast<size_t>(sent_until_) * problem_.token_bytes;
        output_bytes = static_cast<size_t>(n) * problem_.token_bytes;
        sent_until_ += n;
        action = kWrite;
      } else if (outstanding_ == 0 && !in_read_ &&
                 (!error_.ok() || (reads_done_ && header_seen_ && sent_until_ == total_tokens_))) {
        finished_ = true;
        final_status = ToGrpcStatus(error_);
        action = kFinish;
      }
      if (action == kWrite) {
        writing_ = true;
        write_started_ = MonotonicNow();
      }
    }
    // Only the one write in flight touches outgoing_, and computed output no longer changes; its
    // message refers to the lease without a copy (lease_ is set once, before any output).
    if (output_token >= 0) {
      outgoing_ = AttendOutputBytes(output_token, lease_, output_offset, output_bytes);
      service_->metrics_->bytes_out->Increment(static_cast<double>(output_bytes));
    } else if (action == kWrite) {
      grpc::Slice bytes(accepted);
      outgoing_ = grpc::ByteBuffer(&bytes, 1);
    }
    if (action == kWrite) StartWrite(&outgoing_);
    if (action == kFinish) Finish(final_status);
  }

  grpc::CallbackServerContext* ctx_;
  AttendService* service_;
  ModelRegistry* registry_;
  const size_t chunk_bytes_;  // the most data an output message carries
  RpcGate::Pass pass_;
  grpc::ByteBuffer incoming_;
  grpc::ByteBuffer outgoing_;  // the message being written
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);

  absl::Mutex mu_;
  bool header_seen_ ABSL_GUARDED_BY(mu_) = false;
  Problem problem_ ABSL_GUARDED_BY(mu_);
  // Q, K, V, O, each tensor_bytes long; output messages in flight share it.
  std::shared_ptr<memory::Buffer> lease_;
  absl::Time rpc_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  int64_t total_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t chunk_tokens_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t arrived_[3] ABSL_GUARDED_BY(mu_) = {0, 0, 0};
  int64_t next_stretch_ ABSL_GUARDED_BY(mu_) = 0;             // first token not yet requested
  int64_t outstanding_ ABSL_GUARDED_BY(mu_) = 0;              // requests not yet completed
  std::map<int64_t, int64_t> computed_ ABSL_GUARDED_BY(mu_);  // completed out of order
  int64_t computed_until_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sent_until_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  bool accepted_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool in_read_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time write_started_ ABSL_GUARDED_BY(mu_);  // of the write in flight (writing_)
  int refs_ ABSL_GUARDED_BY(mu_) = 1;  // gRPC's, dropped in OnDone, and one per request
  absl::Time last_read_ ABSL_GUARDED_BY(mu_) = MonotonicNow();
};

}  // namespace internal

int64_t StretchTokens(const OperatorOptions& options, int64_t n) {
  if (options.kind != OperatorKind::kDilatedAttention || n < 1) return n;
  int64_t stretch = 1;
  for (int64_t w : options.dilated.segment_lengths) {
    const int64_t seg = std::clamp<int64_t>(w, 1, n);
    // lcm = stretch / gcd * seg, compared with n before it is formed (it may exceed int64).
    const int64_t factor = stretch / std::gcd(stretch, seg);
    if (factor > n / seg) return n;
    stretch = factor * seg;
    if (stretch >= n) return n;
  }
  return stretch;
}

AttendService::AttendService(ModelRegistry* registry, StreamMetrics* metrics, RpcGate* gate,
                             size_t max_message_bytes, absl::Duration idle_timeout)
    : registry_(registry),
      metrics_(metrics),
      gate_(gate),
      max_message_bytes_(max_message_bytes),
      idle_timeout_(idle_timeout) {
  if (idle_timeout_ > absl::ZeroDuration()) watchdog_ = std::thread([this] { WatchIdleStreams(); });
}

AttendService::~AttendService() {
  {
    absl::MutexLock lock(&watch_mu_);
    stopping_ = true;
  }
  if (watchdog_.joinable()) watchdog_.join();
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttendService::Attend(
    grpc::CallbackServerContext* ctx) {
  absl::StatusOr<RpcGate::Pass> pass = gate_->Enter();
  if (!pass.ok()) return new RefusedStream(ToGrpcStatus(pass.status()));
  const size_t message = std::min(kAttendMessageBytes, max_message_bytes_);
  return new internal::AttendReactor(
      ctx, this, registry_,
      message > 2 * kAttendFramingBytes ? message - kAttendFramingBytes : message / 2,
      *std::move(pass));
}

void AttendService::Register(internal::AttendReactor* r) {
  metrics_->open->Increment();
  absl::MutexLock lock(&watch_mu_);
  streams_.insert(r);
}

void AttendService::Unregister(internal::AttendReactor* r) {
  metrics_->open->Decrement();
  absl::MutexLock lock(&watch_mu_);
  streams_.erase(r);
}

void AttendService::WatchIdleStreams() {
  const absl::Duration tick = std::min(absl::Seconds(1), idle_timeout_ / 4);
  while (true) {
    std::vector<internal::AttendReactor*> idle;
    {
      absl::MutexLock lock(&watch_mu_);
      auto stop = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stopping_; };
      if (AwaitUntil(watch_mu_, absl::Condition(&stop), MonotonicNow() + tick)) return;
      // A reactor leaves the set in its destructor, under this lock, so every one here is
      // alive; the reference taken keeps it so after the lock is released.
      const absl::Time cutoff = MonotonicNow() - idle_timeout_;
      for (internal::AttendReactor* r : streams_) {
        if (r->RefIfIdleSince(cutoff)) idle.push_back(r);
      }
    }
    // Outside the lock: finishing a stream may delete its reactor, which takes the lock.
    for (internal::AttendReactor* r : idle) r->AbortIdle(idle_timeout_);
  }
}

}  // namespace dilattn::server
