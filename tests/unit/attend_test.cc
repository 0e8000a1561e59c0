// The native stream: its stretches (each must start on a segment boundary of every branch, so
// that a stretch computed alone gives exactly the whole sequence's output for its tokens) and
// its own parse of the request bytes.

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "dilattn/v1/attention.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "kernels/block_sparse/block_sparse.h"
#include "server/engine.h"
#include "server/grpc/attend_service.h"
#include "server/grpc/infer_parser.h"
#include "server/grpc/wire.h"
#include "server/metrics.h"
#include "server/model_config.h"
#include "server/model_registry.h"
#include "tests/common/mangled_messages.h"

namespace dilattn::server {
namespace {

OperatorOptions Dilated(std::vector<int64_t> segments) {
  OperatorOptions o;
  o.dilated.segment_lengths = std::move(segments);
  o.dilated.dilation_rates.assign(o.dilated.segment_lengths.size(), 1);
  return o;
}

TEST(Stretch, LeastCommonMultipleOfTheSegments) {
  EXPECT_EQ(StretchTokens(Dilated({2048, 4096, 8192, 16384, 32768}), 1 << 20), 32768);
  EXPECT_EQ(StretchTokens(Dilated({16, 48, 24}), 200), 48);
  EXPECT_EQ(StretchTokens(Dilated({6, 10}), 1000), 30);
}

TEST(Stretch, CappedAtTheSequence) {
  // Segments beyond N are cut to N, and so is a multiple that reaches past N.
  EXPECT_EQ(StretchTokens(Dilated({2048, 4096, 8192, 16384, 32768}), 10000), 10000);
  EXPECT_EQ(StretchTokens(Dilated({500}), 200), 200);
  EXPECT_EQ(StretchTokens(Dilated({7, 11, 13}), 500), 500);
  // No overflow on the way: huge segments stop the product at N.
  // Segments no shorter than the sequence, whose least common multiple exceeds int64.
  EXPECT_EQ(
      StretchTokens(Dilated({(int64_t{1} << 40) - 1, (int64_t{1} << 40) - 2}), int64_t{1} << 40),
      int64_t{1} << 40);
  EXPECT_EQ(StretchTokens(Dilated({(int64_t{1} << 40) - 1, (int64_t{1} << 40) - 3}), 1 << 30),
            1 << 30);
}

TEST(Stretch, BlockSparseTakesTheWholeSequence) {
  OperatorOptions o;
  o.kind = OperatorKind::kBlockSparse;
  EXPECT_EQ(StretchTokens(o, 4096), 4096);
}

// A server's default models on the CPU, as the stream's handler sees them.
struct CpuModels {
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<ModelRegistry> registry;
};

CpuModels MakeCpuModels() {
  CpuModels m;
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create("");
  EXPECT_TRUE(metrics.ok()) << metrics.status();
  m.metrics = *std::move(metrics);
  EngineOptions options;
  options.device = "cpu";
  options.executor.cpu_threads = 1;
  options.executor.host_pool_bytes = size_t{64} << 20;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  m.engine = *std::move(engine);
  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry =
      ModelRegistry::Create(DefaultModels(), m.engine.get(), m.metrics.get());
  EXPECT_TRUE(registry.ok()) << registry.status();
  m.registry = *std::move(registry);
  return m;
}

// The batcher caps the kept block pairs of a block-sparse batch by each request's own count, so
// a stream's requests must carry theirs as a KServe request does (they carried 0: two streams
// each under the cap were batched over it and failed together).
TEST(StretchRequests, BlockSparseCarriesItsKeptPairs) {
  CpuModels m = MakeCpuModels();
  v1::Header h;
  h.set_model("block_sparse_attention");
  h.set_datatype(v1::FP32);
  for (int64_t d : {2, 1000, 3, 16}) h.add_shape(d);
  (*h.mutable_parameters())["block_size"] = "16";
  (*h.mutable_parameters())["pattern"] = "local_window";
  (*h.mutable_parameters())["window"] = "3";
  absl::StatusOr<std::vector<std::unique_ptr<InferenceRequest>>> requests =
      internal::AttendStretchRequests(h, *m.registry);
  ASSERT_TRUE(requests.ok()) << requests.status();
  ASSERT_EQ(requests->size(), 1u);  // a block-sparse stretch is the whole sequence
  const InferenceRequest& r = *requests->front();
  EXPECT_EQ(r.seq_len, 1000);
  absl::StatusOr<block_sparse::BlockSparsePlan> plan = block_sparse::PlanBlockSparse(
      r.options.sparse, attention::DenseShape(attention::DType::kFloat32, 1, 1000, 3, 16));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_GT(plan->kept_pairs, 0);
  EXPECT_EQ(r.kept_pairs, plan->kept_pairs);

  // Dilated attention keeps no pairs; its last, shorter stretch is a request of its own.
  h.set_model("dilated_attention");
  h.clear_parameters();
  (*h.mutable_parameters())["segment_lengths"] = "64,128";
  (*h.mutable_parameters())["dilation_rates"] = "1,2";
  requests = internal::AttendStretchRequests(h, *m.registry);
  ASSERT_TRUE(requests.ok()) << requests.status();
  ASSERT_EQ(requests->size(), 2u);
  EXPECT_EQ((*requests)[0]->seq_len, 128);
  EXPECT_EQ((*requests)[1]->seq_len, 1000 % 128);
  for (const auto& s : *requests) EXPECT_EQ(s->kept_pairs, 0);
}

}  // namespace
}  // namespace dilattn::server

namespace dilattn::server {
namespace {

// The native stream's own parse of AttendRequest bytes (zero-copy for the chunk data) against
// protobuf's, on seeded mutations of valid messages cut into random slices: where ours accepts,
// protobuf accepts with the same fields; where protobuf refuses, ours refuses too.
TEST(AttendBytes, AgreesWithProtobufOnMangledMessages) {
  using google::protobuf::util::MessageDifferencer;
  // Mutated strings fail protobuf's UTF-8 check, which logs each one.
  const google::protobuf::LogSilencer quiet;
  testing::SplitMix64 rng(99);
  std::vector<std::string> valid;
  {
    dilattn::v1::AttendRequest m;
    auto* h = m.mutable_header();
    h->set_model("dilated_attention");
    h->set_datatype(dilattn::v1::BF16);
    for (int64_t d : {1, 4096, 16, 64}) h->add_shape(d);
    (*h->mutable_parameters())["segment_lengths"] = "2048,4096";
    h->set_priority(2);
    h->set_timeout_microseconds(250000);
    valid.push_back(m.SerializeAsString());
    for (int t = 1; t <= 3; ++t) {
      dilattn::v1::AttendRequest c;
      c.mutable_chunk()->set_tensor(static_cast<dilattn::v1::Tensor>(t));
      c.mutable_chunk()->set_token(12345 * t);
      c.mutable_chunk()->set_data(testing::RandomBytes(rng, 300 * t));
      valid.push_back(c.SerializeAsString());
    }
    valid.push_back(valid[0] + valid[1]);  // both: the chunk, last, wins
    valid.push_back(valid[1] + valid[2]);  // two chunks merge
  }
  const testing::ParseAgreement n = testing::CheckAgainstProtobuf<dilattn::v1::AttendRequest>(
      rng, valid, 20000,
      [](const grpc::ByteBuffer& message) { return AttendBytes::Parse(message); },
      [](const AttendBytes& ours, const dilattn::v1::AttendRequest& theirs, int round) {
        ASSERT_EQ(ours.has_header(), theirs.has_header()) << "round " << round;
        ASSERT_EQ(ours.has_chunk(), theirs.has_chunk()) << "round " << round;
        if (theirs.has_header()) {
          EXPECT_TRUE(MessageDifferencer::Equals(ours.header(), theirs.header()))
              << "round " << round;
        }
        if (theirs.has_chunk()) {
          EXPECT_EQ(ours.tensor(), static_cast<int32_t>(theirs.chunk().tensor()));
          EXPECT_EQ(ours.token(), theirs.chunk().token());
          std::string data(ours.data_size(), '\0');
          ours.CopyData(data.data());
          EXPECT_EQ(data, theirs.chunk().data()) << "round " << round;
        }
      });
  EXPECT_GT(n.accepted, 5000);
  EXPECT_GT(n.refused, 1000);
  EXPECT_EQ(n.refused_by_ours_only, 0);
}

// Hand-made encodings at the wire format's edges (see EdgeEncodings) around the header, the chunk
// and, inside a chunk, its data: ours accepts exactly what protobuf accepts.
TEST(AttendBytes, AgreesWithProtobufOnEncodingEdges) {
  testing::SplitMix64 rng(3);
  dilattn::v1::Header header;
  header.set_model("m");
  std::vector<std::string> messages = testing::EdgeEncodings(1, header.SerializeAsString());
  for (int depth : {98, 99, 100}) {  // groups inside the header: one level deeper than above
    std::string nested = header.SerializeAsString();
    for (int i = 0; i < depth; ++i) nested += testing::Varint((99 << 3) | 3);
    for (int i = 0; i < depth; ++i) nested += testing::Varint((99 << 3) | 4);
    messages.push_back(testing::Varint((1 << 3) | 2) + testing::Varint(nested.size()) + nested);
  }
  for (const std::string& chunk : testing::EdgeEncodings(3, "abc")) {
    messages.push_back(testing::Varint((2 << 3) | 2) + testing::Varint(chunk.size()) + chunk);
  }
  int accepted = 0, refused = 0;
  for (const std::string& bytes : messages) {
    dilattn::v1::AttendRequest theirs;
    const bool protobuf = theirs.ParseFromString(bytes);
    EXPECT_EQ(AttendBytes::Parse(testing::AsSlicedMessage(rng, bytes)).ok(), protobuf)
        << absl::CEscape(bytes);
    (protobuf ? accepted : refused)++;
  }
  EXPECT_GT(accepted, 10);
  EXPECT_GT(refused, 10);
}

}  // namespace
}  // namespace dilattn::server

namespace dilattn::server {
namespace {

ModelSpec WithQueuePolicy(absl::Duration default_timeout, bool allow_override) {
  ModelSpec spec = DefaultModels().front();
  spec.batching.default_timeout = default_timeout;
  spec.batching.allow_timeout_override = allow_override;
  return spec;
}

// Triton's rules for its `timeout`, which KServe requests and every stretch of a native stream
// share (RequestTimeout).
TEST(RequestTimeout, TheRequestsOwnWhereTheModelAllowsIt) {
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::ZeroDuration(), true), 0),
            absl::InfiniteDuration());
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::ZeroDuration(), true), 2500),
            absl::Microseconds(2500));
  // Shorter or longer than the default: the request's own replaces it.
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::Seconds(2), true), 2500),
            absl::Microseconds(2500));
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::Seconds(2), true), 5000000), absl::Seconds(5));
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::ZeroDuration(), true),
                           std::numeric_limits<int64_t>::max()),
            absl::Microseconds(std::numeric_limits<int64_t>::max()));
}

TEST(RequestTimeout, TheModelsDefaultWhereNoneIsGivenOrOverridesAreRefused) {
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::Seconds(2), true), 0), absl::Seconds(2));
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::Seconds(2), false), 0), absl::Seconds(2));
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::Seconds(2), false), 2500), absl::Seconds(2));
  EXPECT_EQ(RequestTimeout(WithQueuePolicy(absl::Seconds(2), false), 5000000), absl::Seconds(2));
}

// Triton's rules for `priority`: 1..priority_levels as given; 0 and anything beyond the model's
// levels mean the model's default level (PriorityLevel, shared by KServe requests and the header).
TEST(PriorityLevel, TheRequestsLevelWithinTheModelsElseItsDefault) {
  ModelSpec spec = DefaultModels().front();
  spec.batching.priority_levels = 3;
  spec.batching.default_priority = 2;
  EXPECT_EQ(PriorityLevel(spec, 1), 1);
  EXPECT_EQ(PriorityLevel(spec, 2), 2);
  EXPECT_EQ(PriorityLevel(spec, 3), 3);  // the lowest level is a level, not "beyond"
  EXPECT_EQ(PriorityLevel(spec, 0), 2);
  EXPECT_EQ(PriorityLevel(spec, 4), 2);
  EXPECT_EQ(PriorityLevel(spec, std::numeric_limits<uint64_t>::max()), 2);
}

// The default models on a small CPU engine, for the header's checks.
class AttendHeaderTimeout : public ::testing::Test {
 protected:
  void SetUp() override { models_ = MakeCpuModels(); }

  static dilattn::v1::Header Header() {
    dilattn::v1::Header h;
    h.set_model("dilated_attention");
    h.set_datatype(dilattn::v1::FP32);
    for (int64_t d : {1, 256, 2, 16}) h.add_shape(d);
    (*h.mutable_parameters())["segment_lengths"] = "64,128";
    (*h.mutable_parameters())["dilation_rates"] = "1,2";
    return h;
  }

  // Declared so that the registry, whose schedulers submit to the engine, goes first.
  CpuModels models_;
};

TEST_F(AttendHeaderTimeout, TakesAnyNonNegativeTimeout) {
  dilattn::v1::Header h = Header();
  for (int64_t us : {int64_t{0}, int64_t{1}, std::numeric_limits<int64_t>::max()}) {
    h.set_timeout_microseconds(us);
    const absl::Status s = internal::CheckAttendHeader(h, *models_.registry);
    EXPECT_TRUE(s.ok()) << us << ": " << s;
  }
}

TEST_F(AttendHeaderTimeout, RefusesANegativeTimeoutNamingTheField) {
  dilattn::v1::Header h = Header();
  h.set_timeout_microseconds(-5);
  const absl::Status s = internal::CheckAttendHeader(h, *models_.registry);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("timeout_microseconds -5 must be >= 0"), absl::string_view::npos) << s;
}

TEST_F(AttendHeaderTimeout, PointsSchedulingParametersAtTheirFields) {
  const std::pair<const char*, const char*> kFields[] = {{"timeout", "timeout_microseconds"},
                                                         {"priority", "priority"}};
  for (const auto& [key, field] : kFields) {
    dilattn::v1::Header h = Header();
    (*h.mutable_parameters())[key] = "1000";
    const absl::Status s = internal::CheckAttendHeader(h, *models_.registry);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    const std::string expected =
        absl::StrCat("header parameter '", key, "' is not an operator parameter: set the header's ",
                     field, " field");
    EXPECT_NE(s.message().find(expected), absl::string_view::npos) << s;
  }
}

}  // namespace
}  // namespace dilattn::server
