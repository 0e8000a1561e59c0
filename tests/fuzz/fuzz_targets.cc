#include "tests/fuzz/fuzz_targets.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "dilattn/v1/attention.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "inference/grpc_service.pb.h"
#include "kernels/attention/attention.h"
#include "server/engine.h"
#include "server/grpc/attend_service.h"
#include "server/grpc/infer_parser.h"
#include "server/grpc/wire.h"
#include "server/metrics.h"
#include "server/model_config.h"
#include "server/model_registry.h"
#include "server/shared_memory.h"

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

// The default models on a one-thread CPU engine, built once and kept for the process: the
// parser asks the registry for models and the engine whether it supports what they describe.
struct Server {
  std::unique_ptr<server::Metrics> metrics;
  std::unique_ptr<server::Engine> engine;
  std::unique_ptr<server::ModelRegistry> registry;
  std::unique_ptr<server::SharedMemoryManager> shared_memory;
};

Server& TheServer() {
  static Server* s = [] {
    auto* out = new Server;
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
    auto registry = server::ModelRegistry::Create(server::DefaultModels(), out->engine.get(),
                                                  out->metrics.get());
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
  std::vector<grpc::Slice> slices;
  const size_t step = cut == 0 ? std::max<size_t>(bytes.size(), 1) : cut;
  for (size_t at = 0; at < bytes.size(); at += step) {
    if (cut >= 250 && at > 0) slices.emplace_back();
    slices.emplace_back(bytes.data() + at, std::min(step, bytes.size() - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// What a refused message may be answered with: each names the problem.
void CheckRefusal(const absl::Status& s, const char* what) {
  FUZZ_CHECK(
      s.code() == absl::StatusCode::kInvalidArgument || s.code() == absl::StatusCode::kNotFound,
      what, ": ", s.ToString());
  FUZZ_CHECK(!s.message().empty(), what);
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
  if (!theirs.ParseFromString(bytes)) {
    FUZZ_CHECK(!raw.ok(), "protobuf refuses what the split accepts");
    CheckRefusal(raw.status(), "split");
    return Outcome::kMalformed;
  }
  if (!raw.ok()) {  // stricter than protobuf is allowed, with a reason
    CheckRefusal(raw.status(), "split");
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

  Server& s = TheServer();
  inference::ModelInferResponse response;
  absl::StatusOr<std::unique_ptr<server::InferenceRequest>> parsed = server::ParseInferRequest(
      header, *raw, *s.registry, *s.shared_memory, absl::Now(), absl::InfiniteFuture(), &response);
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
  if (!theirs.ParseFromString(bytes)) {
    FUZZ_CHECK(!ours.ok(), "protobuf refuses what ours accepts");
    CheckRefusal(ours.status(), "attend parse");
    return Outcome::kMalformed;
  }
  if (!ours.ok()) {
    CheckRefusal(ours.status(), "attend parse");
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
        server::internal::CheckAttendHeader(ours->header(), *TheServer().registry);
    if (!s.ok()) {
      CheckRefusal(s, "attend header");
      return Outcome::kRefused;
    }
  }
  return Outcome::kAccepted;
}

namespace {

Seed WithCut(uint8_t cut, const std::string& message, Outcome expect = Outcome::kAccepted) {
  return {std::string(1, static_cast<char>(cut)) + message, expect};
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
  dilattn::v1::AttendRequest h;
  h.mutable_header()->set_model("dilated_attention");
  h.mutable_header()->set_datatype(dilattn::v1::FP16);
  for (int64_t d : {1, 64, 2, 8}) h.mutable_header()->add_shape(d);
  (*h.mutable_header()->mutable_parameters())["segment_lengths"] = "16,32";
  (*h.mutable_header()->mutable_parameters())["dilation_rates"] = "1,2";
  seeds.push_back(WithCut(0, h.SerializeAsString()));
  seeds.push_back(WithCut(5, h.SerializeAsString()));
  dilattn::v1::AttendRequest c;
  c.mutable_chunk()->set_tensor(dilattn::v1::K);
  c.mutable_chunk()->set_token(3);
  c.mutable_chunk()->set_data(Bytes(2 * 8 * 2 * 4, 1));
  seeds.push_back(WithCut(0, c.SerializeAsString()));
  seeds.push_back(WithCut(9, c.SerializeAsString() + h.SerializeAsString()));
  return seeds;
}

}  // namespace dilattn::fuzz
