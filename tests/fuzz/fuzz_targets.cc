#include "tests/fuzz/fuzz_targets.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "dilattn/v1/attention.grpc.pb.h"
#include "dilattn/v1/attention.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "inference/grpc_service.pb.h"
#include "kernels/attention/attention.h"
#include "kernels/common/clock.h"
#include "server/engine.h"
#include "server/grpc/attend_service.h"
#include "server/grpc/infer_parser.h"
#include "server/grpc/wire.h"
#include "server/metrics.h"
#include "server/model_config.h"
#include "server/model_registry.h"
#include "server/server.h"
#include "server/shared_memory.h"
#include "tests/common/mangled_messages.h"
#include "tests/common/multihead_util.h"

namespace dilattn::fuzz {
namespace {

using google::protobuf::util::MessageDifferencer;
using server::RequestBytes;

[[noreturn]] void Fail(const char* file, int line, const char* what, const std::string& detail) {
  std::fprintf(stderr, "%s:%d: fuzz check failed: %s %s\n", file, line, what, detail.c_str());
  std::abort();
}

#define FUZZ_CHECK(cond, ...)                                                                  \
  do {                                                                                         \
    if (!(cond)) Fail(__FILE__, __LINE__, #cond, absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)

// A multihead model (E = 8, 2 heads) over random weights written to a temporary directory, so
// that requests carrying hidden states X reach their own checks.
server::ModelSpec MultiheadSpec() {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / absl::StrCat("dilattn-fuzz-", getpid());
  std::filesystem::create_directories(dir);
  testing::SplitMix64 rng(7);
  const std::string weights =
      testing::SafetensorsBytes(testing::RandomWeightTensors(rng, 8, true, true));
  std::ofstream((dir / "weights.safetensors").string(), std::ios::binary) << weights;
  absl::StatusOr<server::ModelSpec> spec = server::ParseModelConfig(
      R"(name: "mha"
         parameters { key: "operator" value { string_value: "multihead_dilated_attention" } }
         parameters { key: "weights" value { string_value: "weights.safetensors" } }
         parameters { key: "num_heads" value { string_value: "2" } }
         parameters { key: "segment_lengths" value { string_value: "4,8" } }
         parameters { key: "dilation_rates" value { string_value: "1,2" } })",
      "fuzz multihead config", "mha", dir.string());
  FUZZ_CHECK(spec.ok(), spec.status().ToString());
  std::filesystem::remove_all(dir);  // the weights are loaded
  return *std::move(spec);
}

// The default models and the multihead one on a one-thread CPU engine, built once and kept for
// the process: the parser asks the registry for models and the engine whether it supports what
// they describe.
struct Parsers {
  std::unique_ptr<server::Metrics> metrics;
  std::unique_ptr<server::Engine> engine;
  std::unique_ptr<server::ModelRegistry> registry;
  std::unique_ptr<server::SharedMemoryManager> shared_memory;
};

Parsers& TheParsers() {
  static Parsers* s = [] {
    auto* out = new Parsers;
    auto metrics = server::Metrics::Create("");
    FUZZ_CHECK(metrics.ok(), metrics.status().ToString());
    out->metrics = std::move(*metrics);
    server::EngineOptions options;
    options.device = "cpu";
    options.executor.cpu_threads = 1;
    options.executor.host_pool_bytes = size_t{64} << 20;
    auto engine = server::Engine::Create(options);
    FUZZ_CHECK(engine.ok(), engine.status().ToString());
    out->engine = std::move(*engine);
    std::vector<server::ModelSpec> specs = server::DefaultModels();
    specs.push_back(MultiheadSpec());
    auto registry =
        server::ModelRegistry::Create(std::move(specs), out->engine.get(), out->metrics.get());
    FUZZ_CHECK(registry.ok(), registry.status().ToString());
    out->registry = std::move(*registry);
    out->shared_memory =
        std::make_unique<server::SharedMemoryManager>(server::SharedMemoryOptions{});
    return out;
  }();
  return *s;
}

// The message of an input (after its first byte) as gRPC hands it over: in slices of `cut`
// bytes (one slice for 0), with an empty slice between them for cut >= 250.
grpc::ByteBuffer Sliced(const std::string& bytes, uint8_t cut) {
  const size_t step = cut == 0 ? std::max<size_t>(bytes.size(), 1) : cut;
  bool empty_next = false;
  return testing::AsSlicedMessage(bytes, [&] {
    const size_t n = empty_next ? 0 : step;
    empty_next = cut >= 250 && !empty_next;
    return n;
  });
}

// What a refused message may be answered with: each names the problem.
void CheckRefusal(const absl::Status& s, const char* what) {
  FUZZ_CHECK(
      s.code() == absl::StatusCode::kInvalidArgument || s.code() == absl::StatusCode::kNotFound,
      what, ": ", s.ToString());
  FUZZ_CHECK(!s.message().empty(), what);
}

// Where protobuf refuses, ours must refuse too; ours may refuse more, with a reason. Returns
// whether ours refused.
bool RefusedLikeProtobuf(const absl::Status& ours, bool protobuf_accepts, const char* what) {
  if (ours.ok()) {
    FUZZ_CHECK(protobuf_accepts, "protobuf refuses what ours accepts: ", what);
    return false;
  }
  CheckRefusal(ours, what);
  return true;
}

int TensorIndex(const std::string& name) {
  if (name == "K") return 1;
  if (name == "V") return 2;
  return 0;  // Q, or the multihead module's X
}

// An accepted request's tensors against the message: sizes as its shape says, and, once the
// background copy is done, the raw contents byte for byte.
void CheckAccepted(const server::InferenceRequest& r, const inference::ModelInferRequest& header,
                   const inference::ModelInferRequest& theirs) {
  FUZZ_CHECK(r.batch >= 1 && r.seq_len >= 1 && r.heads >= 1 && r.head_dim >= 1);
  if (r.options.kind != server::OperatorKind::kMultihead) {
    FUZZ_CHECK(r.tensor_bytes == static_cast<size_t>(r.tokens() * r.heads * r.head_dim) *
                                     attention::DTypeSize(r.dtype),
               r.tensor_bytes);
  }
  for (int i = 0; i < r.inputs(); ++i) {
    FUZZ_CHECK(r.tensor(i).size() == r.tensor_bytes, i, " ", r.tensor(i).size());
  }
  if (r.fill != nullptr) r.fill->WaitForAll();
  if (theirs.raw_input_contents_size() == 0) return;
  for (int j = 0; j < header.inputs_size(); ++j) {
    const std::string& raw = theirs.raw_input_contents(j);
    const absl::string_view got = r.tensor(TensorIndex(header.inputs(j).name()));
    FUZZ_CHECK(got == raw, "input ", header.inputs(j).name(), " differs from its raw contents");
  }
}

}  // namespace

Outcome InferRequestTarget(const uint8_t* data, size_t size) {
  if (size == 0) return Outcome::kMalformed;
  const google::protobuf::LogSilencer quiet;  // protobuf logs every malformed string it meets
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  inference::ModelInferRequest header;
  absl::StatusOr<RequestBytes> raw = RequestBytes::Split(Sliced(bytes, data[0]), &header);
  inference::ModelInferRequest theirs;
  if (RefusedLikeProtobuf(raw.status(), theirs.ParseFromString(bytes), "split")) {
    return Outcome::kMalformed;
  }
  FUZZ_CHECK(raw->raw_count() == static_cast<size_t>(theirs.raw_input_contents_size()));
  for (size_t i = 0; i < raw->raw_count(); ++i) {
    const std::string& want = theirs.raw_input_contents(static_cast<int>(i));
    FUZZ_CHECK(raw->raw_size(i) == want.size(), i);
    std::string got(want.size(), '\0');
    raw->CopyRaw(i, got.data());
    FUZZ_CHECK(got == want, "raw contents ", i);
    const size_t offset = want.size() / 3, length = want.size() / 2;
    std::string part(length, '\0');
    raw->CopyRawRange(i, offset, length, part.data());
    FUZZ_CHECK(part == want.substr(offset, length), "range of raw contents ", i);
  }
  inference::ModelInferRequest header_of_theirs = theirs;
  header_of_theirs.clear_raw_input_contents();
  FUZZ_CHECK(MessageDifferencer::Equals(header, header_of_theirs), "headers differ");

  Parsers& s = TheParsers();
  inference::ModelInferResponse response;
  absl::StatusOr<std::unique_ptr<server::InferenceRequest>> parsed =
      server::ParseInferRequest(header, *raw, *s.registry, *s.shared_memory, MonotonicNow(),
                                absl::InfiniteFuture(), &response);
  if (!parsed.ok()) {
    CheckRefusal(parsed.status(), "parse");
    return Outcome::kRefused;
  }
  CheckAccepted(**parsed, header, theirs);
  return Outcome::kAccepted;
}

Outcome AttendRequestTarget(const uint8_t* data, size_t size) {
  if (size == 0) return Outcome::kMalformed;
  const google::protobuf::LogSilencer quiet;
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  absl::StatusOr<server::AttendBytes> ours = server::AttendBytes::Parse(Sliced(bytes, data[0]));
  dilattn::v1::AttendRequest theirs;
  if (RefusedLikeProtobuf(ours.status(), theirs.ParseFromString(bytes), "attend parse")) {
    return Outcome::kMalformed;
  }
  FUZZ_CHECK(ours->has_header() == theirs.has_header());
  FUZZ_CHECK(ours->has_chunk() == theirs.has_chunk());
  if (theirs.has_chunk()) {
    const dilattn::v1::Chunk& c = theirs.chunk();
    FUZZ_CHECK(ours->tensor() == static_cast<int32_t>(c.tensor()));
    FUZZ_CHECK(ours->token() == c.token());
    FUZZ_CHECK(ours->data_size() == c.data().size());
    std::string got(c.data().size(), '\0');
    ours->CopyData(got.data());
    FUZZ_CHECK(got == c.data(), "chunk data");
  }
  if (theirs.has_header()) {
    FUZZ_CHECK(MessageDifferencer::Equals(ours->header(), theirs.header()), "headers differ");
    const absl::Status s =
        server::internal::CheckAttendHeader(ours->header(), *TheParsers().registry);
    if (!s.ok()) {
      CheckRefusal(s, "attend header");
      return Outcome::kRefused;
    }
  }
  return Outcome::kAccepted;
}

namespace {

// A server on a loopback port with the default models on a one-thread CPU engine, and a stub,
// for the process's lifetime.
struct StreamServer {
  std::unique_ptr<server::Server> server;
  std::unique_ptr<dilattn::v1::DilatedAttention::Stub> stub;
};

StreamServer& TheStreamServer() {
  static StreamServer* s = [] {
    auto* out = new StreamServer;
    server::ServerOptions options;
    options.bind_address = "127.0.0.1";
    options.grpc_port = 0;
    options.metrics_port = -1;
    options.engine.device = "cpu";
    options.engine.executor.cpu_threads = 1;
    options.engine.executor.host_pool_bytes = size_t{64} << 20;
    options.stream_idle = absl::Seconds(5);
    auto started = server::Server::Start(options);
    FUZZ_CHECK(started.ok(), started.status().ToString());
    out->server = std::move(*started);
    out->stub = dilattn::v1::DilatedAttention::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", out->server->grpc_port()), grpc::InsecureChannelCredentials()));
    return out;
  }();
  return *s;
}

std::vector<dilattn::v1::AttendRequest> Messages(const uint8_t* data, size_t size) {
  std::vector<dilattn::v1::AttendRequest> out;
  for (size_t at = 0; at + 2 <= size;) {
    const size_t n = std::min<size_t>(data[at] | (size_t{data[at + 1]} << 8), size - at - 2);
    dilattn::v1::AttendRequest m;
    if (m.ParseFromArray(data + at + 2, static_cast<int>(n))) out.push_back(std::move(m));
    at += 2 + n;
  }
  return out;
}

size_t DataTypeBytes(dilattn::v1::DataType t) { return t == dilattn::v1::FP32 ? 4 : 2; }

// Whether the stream of `messages` is one the protocol accepts, given whether the server takes
// its header: one header first, then chunks of Q, K and V each in token order without gaps, of
// whole tokens, within the shape, until all three are whole.
bool StreamIsValid(const std::vector<dilattn::v1::AttendRequest>& messages, bool header_ok,
                   int64_t* total_tokens, size_t* token_bytes) {
  if (messages.empty() || !messages[0].has_header() || !header_ok) return false;
  const dilattn::v1::Header& h = messages[0].header();
  *token_bytes = DataTypeBytes(h.datatype()) * static_cast<size_t>(h.shape(2) * h.shape(3));
  *total_tokens = h.shape(0) * h.shape(1);
  int64_t arrived[3] = {0, 0, 0};
  for (size_t i = 1; i < messages.size(); ++i) {
    if (!messages[i].has_chunk()) return false;  // a second header, or neither
    const dilattn::v1::Chunk& c = messages[i].chunk();
    const int t = static_cast<int>(c.tensor()) - 1;
    if (t < 0 || t > 2 || c.token() != arrived[t]) return false;
    const size_t bytes = c.data().size();
    if (bytes == 0 || bytes % *token_bytes != 0) return false;
    const int64_t tokens = static_cast<int64_t>(bytes / *token_bytes);
    if (tokens > *total_tokens - arrived[t]) return false;
    arrived[t] += tokens;
  }
  return *std::min_element(arrived, arrived + 3) == *total_tokens;
}

}  // namespace

Outcome StreamTarget(const uint8_t* data, size_t size) {
  const google::protobuf::LogSilencer quiet;
  const std::vector<dilattn::v1::AttendRequest> messages = Messages(data, size);
  StreamServer& s = TheStreamServer();
  const bool header_ok =
      !messages.empty() && messages[0].has_header() &&
      server::internal::CheckAttendHeader(messages[0].header(), s.server->registry()).ok();
  int64_t total_tokens = 0;
  size_t token_bytes = 0;
  const bool valid = StreamIsValid(messages, header_ok, &total_tokens, &token_bytes);

  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = s.stub->Attend(&ctx);
  for (const auto& m : messages) {
    if (!stream->Write(m)) break;  // the server has ended the stream
  }
  stream->WritesDone();
  std::vector<dilattn::v1::AttendResponse> responses;
  for (dilattn::v1::AttendResponse r; stream->Read(&r);) responses.push_back(r);
  const grpc::Status status = stream->Finish();
  FUZZ_CHECK(status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED, "the stream hung");
  FUZZ_CHECK(status.ok() == valid, "stream ended ", status.error_code(), " ",
             status.error_message(), " where the protocol says ", valid ? "OK" : "an error");
  if (!status.ok()) {
    FUZZ_CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
                   status.error_code() == grpc::StatusCode::NOT_FOUND ||
                   status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED,
               status.error_code(), " ", status.error_message());
    FUZZ_CHECK(!status.error_message().empty());
    return header_ok ? Outcome::kRefused : Outcome::kMalformed;
  }
  FUZZ_CHECK(!responses.empty() && responses[0].has_accepted(), "no Accepted first");
  int64_t next = 0;
  for (size_t i = 1; i < responses.size(); ++i) {
    FUZZ_CHECK(responses[i].has_output(), "response ", i);
    const dilattn::v1::OutputChunk& o = responses[i].output();
    FUZZ_CHECK(o.token() == next, "output at token ", o.token(), ", expected ", next);
    FUZZ_CHECK(!o.data().empty() && o.data().size() % token_bytes == 0, o.data().size());
    next += static_cast<int64_t>(o.data().size() / token_bytes);
  }
  FUZZ_CHECK(next == total_tokens, "output ", next, " of ", total_tokens, " tokens");
  return Outcome::kAccepted;
}

namespace {

Seed WithCut(uint8_t cut, const std::string& message, Outcome expect = Outcome::kAccepted) {
  return {std::string(1, static_cast<char>(cut)) + message, expect};
}

// A stream's header for dilated_attention with two branches of rates 1 and 2.
dilattn::v1::AttendRequest HeaderMessage(dilattn::v1::DataType datatype,
                                         std::initializer_list<int64_t> shape,
                                         const std::string& segment_lengths) {
  dilattn::v1::AttendRequest h;
  h.mutable_header()->set_model("dilated_attention");
  h.mutable_header()->set_datatype(datatype);
  for (int64_t d : shape) h.mutable_header()->add_shape(d);
  (*h.mutable_header()->mutable_parameters())["segment_lengths"] = segment_lengths;
  (*h.mutable_header()->mutable_parameters())["dilation_rates"] = "1,2";
  return h;
}

std::string Bytes(size_t n, uint8_t seed) {
  std::string out(n, '\0');
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<char>((i * 131 + seed * 7) & 0xff);
  return out;
}

}  // namespace

std::vector<Seed> InferRequestSeeds() {
  std::vector<Seed> seeds;
  struct Variant {
    const char* model;
    const char* datatype;
    size_t elem;
    std::vector<std::pair<const char*, const char*>> params;
  };
  const std::vector<Variant> variants = {
      {"dilated_attention", "FP32", 4, {}},
      {"dilated_attention", "FP16", 2, {{"segment_lengths", "4,8"}, {"dilation_rates", "1,2"}}},
      {"dilated_attention_head_groups", "BF16", 2, {{"causal", "true"}}},
      {"dilated_attention", "FP32", 4, {{"mode", "head_groups"}, {"softmax_scale", "0.5"}}},
      {"block_sparse_attention", "FP16", 2, {}},
  };
  for (const Variant& v : variants) {
    inference::ModelInferRequest m;
    m.set_model_name(v.model);
    m.set_id("fuzz");
    for (const auto& [key, value] : v.params) {
      (*m.mutable_parameters())[key].set_string_param(value);
    }
    (*m.mutable_parameters())["priority"].set_uint64_param(1);
    for (const char* name : {"Q", "K", "V"}) {
      auto* in = m.add_inputs();
      in->set_name(name);
      in->set_datatype(v.datatype);
      // Eight heads: head_groups needs one per branch at least.
      for (int64_t d : {1, 8, 8, 4}) in->add_shape(d);
      m.add_raw_input_contents(Bytes(8 * 8 * 4 * v.elem, static_cast<uint8_t>(seeds.size())));
    }
    m.add_outputs()->set_name("O");
    seeds.push_back(WithCut(0, m.SerializeAsString()));
    seeds.push_back(WithCut(7, m.SerializeAsString()));
    // The same with one input a byte longer, then a byte shorter, than its shape: refused.
    for (int extra : {1, -1}) {
      inference::ModelInferRequest wrong = m;
      std::string* k = wrong.mutable_raw_input_contents(1);
      k->resize(k->size() + extra, 'x');
      seeds.push_back(WithCut(3, wrong.SerializeAsString(), Outcome::kRefused));
    }
  }
  for (const char* datatype : {"FP32", "BF16"}) {  // hidden states X for the multihead model
    inference::ModelInferRequest x;
    x.set_model_name("mha");
    auto* in = x.add_inputs();
    in->set_name("X");
    in->set_datatype(datatype);
    for (int64_t d : {1, 8, 8}) in->add_shape(d);
    x.add_raw_input_contents(Bytes(8 * 8 * (datatype[0] == 'F' ? 4 : 2), 5));
    seeds.push_back(WithCut(0, x.SerializeAsString()));
  }
  inference::ModelInferRequest shm;  // an input in a region that is not registered
  shm.set_model_name("dilated_attention");
  auto* in = shm.add_inputs();
  in->set_name("Q");
  in->set_datatype("FP32");
  for (int64_t d : {1, 8, 8, 4}) in->add_shape(d);
  (*in->mutable_parameters())["shared_memory_region"].set_string_param("region");
  (*in->mutable_parameters())["shared_memory_byte_size"].set_int64_param(1024);
  seeds.push_back(WithCut(0, shm.SerializeAsString(), Outcome::kRefused));
  return seeds;
}

std::vector<Seed> AttendRequestSeeds() {
  std::vector<Seed> seeds;
  const dilattn::v1::AttendRequest h = HeaderMessage(dilattn::v1::FP16, {1, 64, 2, 8}, "16,32");
  seeds.push_back(WithCut(0, h.SerializeAsString()));
  seeds.push_back(WithCut(5, h.SerializeAsString()));
  dilattn::v1::AttendRequest c;
  c.mutable_chunk()->set_tensor(dilattn::v1::K);
  c.mutable_chunk()->set_token(3);
  c.mutable_chunk()->set_data(Bytes(2 * 8 * 2 * 4, 1));
  seeds.push_back(WithCut(0, c.SerializeAsString()));
  seeds.push_back(WithCut(9, c.SerializeAsString() + h.SerializeAsString()));
  // A chunk of 4 bytes whose data field (5 bytes) runs past it: malformed, though the message
  // holds the bytes.
  seeds.push_back(
      WithCut(0, std::string("\x12\x04\x08\x02\x1a\x05") + "abcde", Outcome::kMalformed));
  return seeds;
}

std::vector<Seed> StreamSeeds() {
  std::vector<Seed> seeds;
  auto record = [](const google::protobuf::Message& m) {
    const std::string bytes = m.SerializeAsString();
    return std::string{static_cast<char>(bytes.size() & 0xff),
                       static_cast<char>(bytes.size() >> 8)} +
           bytes;
  };
  const dilattn::v1::AttendRequest h = HeaderMessage(dilattn::v1::FP32, {1, 8, 2, 4}, "4,8");
  constexpr size_t kTokenBytes = 2 * 4 * 4;
  // Q, K and V in chunks of `step` tokens, interleaved; `cut` drops the last chunk of V.
  auto stream = [&](int64_t step, bool cut) {
    std::string s = record(h);
    for (int64_t token = 0; token < 8; token += step) {
      for (auto t : {dilattn::v1::Q, dilattn::v1::K, dilattn::v1::V}) {
        if (cut && t == dilattn::v1::V && token + step >= 8) continue;
        dilattn::v1::AttendRequest c;
        c.mutable_chunk()->set_tensor(t);
        c.mutable_chunk()->set_token(token);
        c.mutable_chunk()->set_data(Bytes(static_cast<size_t>(step) * kTokenBytes, t));
        s += record(c);
      }
    }
    return s;
  };
  // Streams that break the protocol once, each at a chunk of K (valid otherwise): an overlap, a
  // gap, a run past the shape, part of a token, no tensor, a chunk before the header.
  struct Chunk {
    dilattn::v1::Tensor tensor;
    int64_t token, tokens;
    size_t extra_bytes = 0;
  };
  auto chunks = [&](const std::vector<Chunk>& list, bool header_first = true) {
    std::string s = header_first ? record(h) : "";
    for (const Chunk& c : list) {
      dilattn::v1::AttendRequest m;
      m.mutable_chunk()->set_tensor(c.tensor);
      m.mutable_chunk()->set_token(c.token);
      m.mutable_chunk()->set_data(
          Bytes(static_cast<size_t>(c.tokens) * kTokenBytes + c.extra_bytes, 3));
      s += record(m);
    }
    return header_first ? s : s + record(h);
  };
  using dilattn::v1::K;
  using dilattn::v1::Q;
  using dilattn::v1::V;
  const std::vector<Chunk> whole = {{Q, 0, 8}, {K, 0, 4}, {K, 4, 4}, {V, 0, 8}};
  seeds.push_back({chunks(whole), Outcome::kAccepted});
  for (const Chunk& wrong : std::vector<Chunk>{{K, 3, 4},
                                               {K, 5, 4},
                                               {K, 4, 5},
                                               {K, 4, 3, 1},
                                               {dilattn::v1::TENSOR_UNSPECIFIED, 4, 4}}) {
    std::vector<Chunk> list = whole;
    list[2] = wrong;
    seeds.push_back({chunks(list), Outcome::kRefused});
  }
  seeds.push_back({chunks(whole, /*header_first=*/false), Outcome::kMalformed});
  seeds.push_back({stream(8, false), Outcome::kAccepted});
  seeds.push_back({stream(2, false), Outcome::kAccepted});
  seeds.push_back({stream(4, true), Outcome::kRefused});
  seeds.push_back({record(h) + record(h), Outcome::kRefused});
  dilattn::v1::AttendRequest unknown = h;
  unknown.mutable_header()->set_model("no_such_model");
  seeds.push_back(
      {stream(8, false).replace(0, record(h).size(), record(unknown)), Outcome::kMalformed});
  return seeds;
}

}  // namespace dilattn::fuzz
