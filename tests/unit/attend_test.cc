// The native stream: its stretches (each must start on a segment boundary of every branch, so
// that a stretch computed alone gives exactly the whole sequence's output for its tokens) and
// its own parse of the request bytes.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "dilattn/v1/attention.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "server/grpc/attend_service.h"
#include "server/grpc/wire.h"
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
