// The zero-copy framing of messages (server/grpc/wire.h) against protobuf's own parser: every
// Triton inference request is split by RequestBytes::Split, every response with an output is
// framed by InferResponseBytes or StreamResponseBytes, and the native stream's output chunks by
// AttendOutputBytes.

#include "server/grpc/wire.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "dilattn/v1/attention.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "inference/grpc_service.pb.h"
#include "kernels/memory/allocator.h"
#include "kernels/memory/buffer_pool.h"
#include "tests/common/mangled_messages.h"

namespace dilattn::server {
namespace {

using google::protobuf::util::MessageDifferencer;
using inference::ModelInferRequest;
using inference::ModelInferResponse;
using inference::ModelStreamInferResponse;
using testing::AsSlicedMessage;
using testing::Below;
using testing::RandomBytes;
using testing::SplitMix64;

std::string Flatten(const grpc::ByteBuffer& message) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(message.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& s : slices) {
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

// Requests as clients send them: a header of every kind of field and raw tensors.
std::vector<std::string> ValidRequests(SplitMix64& rng) {
  std::vector<std::string> valid;
  ModelInferRequest m;
  m.set_model_name("dilated_attention");
  m.set_model_version("1");
  m.set_id("request-7");
  (*m.mutable_parameters())["priority"].set_int64_param(2);
  (*m.mutable_parameters())["timeout"].set_int64_param(5000000);
  for (const char* name : {"Q", "K", "V"}) {
    auto* in = m.add_inputs();
    in->set_name(name);
    in->set_datatype("FP16");
    for (int64_t d : {1, 64, 2, 8}) in->add_shape(d);
    m.add_raw_input_contents(RandomBytes(rng, 64 * 2 * 8 * 2));
  }
  m.add_outputs()->set_name("O");
  valid.push_back(m.SerializeAsString());
  ModelInferRequest one;  // one input, shared-memory parameters, no raw contents
  one.set_model_name("multihead");
  auto* x = one.add_inputs();
  x->set_name("X");
  x->set_datatype("BF16");
  for (int64_t d : {1, 16, 64}) x->add_shape(d);
  (*x->mutable_parameters())["shared_memory_region"].set_string_param("region");
  (*x->mutable_parameters())["shared_memory_byte_size"].set_int64_param(2048);
  valid.push_back(one.SerializeAsString());
  ModelInferRequest raw_only;
  raw_only.add_raw_input_contents(RandomBytes(rng, 300));
  raw_only.add_raw_input_contents("");
  valid.push_back(raw_only.SerializeAsString());
  // Concatenated messages merge: raw contents between header fields, repeated fields appended.
  valid.push_back(valid[2] + valid[1]);
  valid.push_back(valid[0] + valid[2] + valid[1]);
  return valid;
}

// Where our split accepts, protobuf accepts with the same header and the same raw contents in
// the same order; where protobuf refuses, ours refuses too. Seeded mutations of valid requests,
// each cut into random slices.
TEST(RequestBytes, AgreesWithProtobufOnMangledMessages) {
  // Mutated strings fail protobuf's UTF-8 check, which logs each one.
  const google::protobuf::LogSilencer quiet;
  SplitMix64 rng(20261127);
  const std::vector<std::string> valid = ValidRequests(rng);
  ModelInferRequest header;
  const testing::ParseAgreement n = testing::CheckAgainstProtobuf<ModelInferRequest>(
      rng, valid, 20000,
      [&](const grpc::ByteBuffer& message) {
        absl::StatusOr<RequestBytes> ours = RequestBytes::Split(message, &header);
        if (!ours.ok()) {
          EXPECT_NE(ours.status().message().find("ModelInferRequest"), std::string::npos);
        }
        return ours;
      },
      [&](const RequestBytes& ours, ModelInferRequest& theirs, int round) {
        ASSERT_EQ(ours.raw_count(), static_cast<size_t>(theirs.raw_input_contents_size()))
            << "round " << round;
        for (size_t i = 0; i < ours.raw_count(); ++i) {
          ASSERT_EQ(ours.raw_size(i), theirs.raw_input_contents(static_cast<int>(i)).size());
          std::string raw(ours.raw_size(i), '\0');
          ours.CopyRaw(i, raw.data());
          EXPECT_EQ(raw, theirs.raw_input_contents(static_cast<int>(i))) << "round " << round;
        }
        theirs.clear_raw_input_contents();
        EXPECT_TRUE(MessageDifferencer::Equals(header, theirs)) << "round " << round;
      });
  EXPECT_GT(n.accepted, 4000);
  EXPECT_GT(n.refused, 1000);
  EXPECT_EQ(n.refused_by_ours_only, 0);
}

// Hand-made encodings at the wire format's edges (tags and lengths in overlong varints, bits past
// 32, field numbers out of range, every wire type, groups) around a raw tensor and a header
// string: ours accepts exactly what protobuf accepts.
TEST(RequestBytes, AgreesWithProtobufOnEncodingEdges) {
  const google::protobuf::LogSilencer quiet;
  SplitMix64 rng(3);
  int accepted = 0, refused = 0;
  for (int field : {7, 1}) {  // raw_input_contents, model_name
    for (const std::string& bytes : testing::EdgeEncodings(field, "abc")) {
      ModelInferRequest header, theirs;
      const bool ours = RequestBytes::Split(AsSlicedMessage(rng, bytes), &header).ok();
      const bool protobuf = theirs.ParseFromString(bytes);
      EXPECT_EQ(ours, protobuf) << "field " << field << ": " << absl::CEscape(bytes);
      (protobuf ? accepted : refused)++;
    }
  }
  EXPECT_GT(accepted, 10);
  EXPECT_GT(refused, 10);
}

// Raw contents large enough for the copy to run on several threads (whole slices each) arrive
// intact, whatever the slices' lengths.
TEST(RequestBytes, CopiesLargeRawContentsAcrossSlices) {
  SplitMix64 rng(5);
  ModelInferRequest m;
  m.set_model_name("dilated_attention");
  m.add_raw_input_contents(RandomBytes(rng, (size_t{96} << 20) + 12345));
  m.add_raw_input_contents(RandomBytes(rng, 777));
  ModelInferRequest header;
  absl::StatusOr<RequestBytes> ours = RequestBytes::Split(
      AsSlicedMessage(m.SerializeAsString(),  // gRPC-sized slices, of uneven length
                      [&] { return (size_t{1} << 20) + Below(rng, 4096); }),
      &header);
  ASSERT_TRUE(ours.ok()) << ours.status();
  ASSERT_EQ(ours->raw_count(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    std::string raw(ours->raw_size(i), '\x5a');  // poisoned
    ours->CopyRaw(i, raw.data());
    EXPECT_TRUE(raw == m.raw_input_contents(static_cast<int>(i))) << "raw " << i;
  }
  EXPECT_EQ(header.model_name(), "dilated_attention");
}

// The background copy's unit (InputFill): any byte range of a raw input, in slices of any size,
// empty ones included, and with other fields between the raw inputs.
TEST(RequestBytes, CopiesAnyRangeOfARawInput) {
  SplitMix64 rng(11);
  for (int round = 0; round < 40; ++round) {
    ModelInferRequest m;
    m.set_model_name("dilated_attention");
    const int raws = 1 + static_cast<int>(Below(rng, 3));
    for (int i = 0; i < raws; ++i) {
      m.add_raw_input_contents(RandomBytes(rng, Below(rng, 20000)));
    }
    m.set_id("between");
    ModelInferRequest header;
    absl::StatusOr<RequestBytes> ours = RequestBytes::Split(
        AsSlicedMessage(m.SerializeAsString(),
                        [&] { return Below(rng, 3) == 0 ? 0 : Below(rng, 3000) + 1; }),
        &header);
    ASSERT_TRUE(ours.ok()) << ours.status();
    ASSERT_EQ(ours->raw_count(), static_cast<size_t>(raws));
    for (int i = 0; i < raws; ++i) {
      const std::string& want = m.raw_input_contents(i);
      for (int draw = 0; draw < 20; ++draw) {
        const size_t offset = Below(rng, want.size() + 1);
        const size_t length = Below(rng, want.size() - offset + 1);
        std::string got(length + 2, '\x5a');  // poisoned, with a guard byte each side
        ours->CopyRawRange(static_cast<size_t>(i), offset, length, got.data() + 1);
        ASSERT_EQ(got.substr(1, length), want.substr(offset, length))
            << "round " << round << ", raw " << i << ", bytes [" << offset << ", "
            << offset + length << ")";
        ASSERT_EQ(got.front(), '\x5a');
        ASSERT_EQ(got.back(), '\x5a');
      }
    }
  }
}

std::unique_ptr<memory::BufferPool> HostPool() {
  absl::StatusOr<std::unique_ptr<memory::BufferPool>> pool =
      memory::BufferPool::Create({"test", size_t{64} << 20}, memory::NewHostAllocator());
  EXPECT_TRUE(pool.ok());
  return pool.ok() ? *std::move(pool) : nullptr;
}

ModelInferResponse ResponseHeader() {
  ModelInferResponse r;
  r.set_model_name("dilated_attention");
  r.set_model_version("1");
  r.set_id("request-7");
  auto* out = r.add_outputs();
  out->set_name("O");
  out->set_datatype("BF16");
  for (int64_t d : {1, 300, 2, 8}) out->add_shape(d);
  return r;
}

// A response framed around the output lease parses, with protobuf, to the header with the lease's
// bytes as raw_output_contents[0]; the lease goes back to its pool once gRPC lets go of the
// message. An output in shared memory is an empty raw_output_contents[0].
TEST(ResponseBytes, ParseAsTheHeaderWithTheOutput) {
  std::unique_ptr<memory::BufferPool> pool = HostPool();
  ASSERT_NE(pool, nullptr);
  SplitMix64 rng(11);
  const ModelInferResponse header = ResponseHeader();
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{300 * 2 * 8 * 2}, size_t{1} << 20}) {
    for (bool stream : {false, true}) {
      absl::StatusOr<memory::Buffer> lease = pool->Acquire(std::max<size_t>(bytes, 1));
      ASSERT_TRUE(lease.ok());
      const std::string output = RandomBytes(rng, bytes);
      if (bytes > 0) std::memcpy(lease->data(), output.data(), bytes);
      std::string flat;
      if (stream) {
        ModelStreamInferResponse outer;
        *outer.mutable_infer_response() = header;
        flat = Flatten(StreamResponseBytes(outer, *std::move(lease), bytes));
        ModelStreamInferResponse parsed;
        ASSERT_TRUE(parsed.ParseFromString(flat)) << bytes;
        EXPECT_TRUE(parsed.error_message().empty());
        ModelInferResponse inner = parsed.infer_response();
        ASSERT_EQ(inner.raw_output_contents_size(), 1) << bytes;
        EXPECT_TRUE(inner.raw_output_contents(0) == output) << bytes;
        inner.clear_raw_output_contents();
        EXPECT_TRUE(MessageDifferencer::Equals(inner, header));
      } else {
        flat = Flatten(InferResponseBytes(header, *std::move(lease), bytes));
        ModelInferResponse parsed;
        ASSERT_TRUE(parsed.ParseFromString(flat)) << bytes;
        ASSERT_EQ(parsed.raw_output_contents_size(), 1) << bytes;
        EXPECT_TRUE(parsed.raw_output_contents(0) == output) << bytes;
        parsed.clear_raw_output_contents();
        EXPECT_TRUE(MessageDifferencer::Equals(parsed, header));
      }
      EXPECT_EQ(pool->stats().bytes_in_use, 0u) << "the lease outlived its message";
    }
  }
}

// The native stream's output chunks: a range of the shared output lease, framed without a copy,
// parses as an AttendResponse with that range as its data; the lease goes back once every
// chunk's message is gone.
TEST(ResponseBytes, OutputChunksParseAsTheirRangeOfTheLease) {
  std::unique_ptr<memory::BufferPool> pool = HostPool();
  ASSERT_NE(pool, nullptr);
  SplitMix64 rng(13);
  constexpr size_t kBytes = 5000;
  absl::StatusOr<memory::Buffer> lease = pool->Acquire(kBytes);
  ASSERT_TRUE(lease.ok());
  const std::string output = RandomBytes(rng, kBytes);
  std::memcpy(lease->data(), output.data(), kBytes);
  auto shared = std::make_shared<const memory::Buffer>(*std::move(lease));
  std::vector<grpc::ByteBuffer> messages;
  const std::vector<std::pair<size_t, size_t>> ranges = {{0, 0}, {0, 1}, {1, 999}, {1000, 4000}};
  for (auto [offset, bytes] : ranges) {
    messages.push_back(AttendOutputBytes(static_cast<int64_t>(offset) * 77 + (int64_t{1} << 40),
                                         shared, offset, bytes));
  }
  shared.reset();
  EXPECT_GT(pool->stats().bytes_in_use, 0u);
  for (size_t i = 0; i < ranges.size(); ++i) {
    dilattn::v1::AttendResponse parsed;
    ASSERT_TRUE(parsed.ParseFromString(Flatten(messages[i]))) << i;
    ASSERT_TRUE(parsed.has_output()) << i;
    EXPECT_EQ(parsed.output().token(),
              static_cast<int64_t>(ranges[i].first) * 77 + (int64_t{1} << 40));
    EXPECT_TRUE(parsed.output().data() == output.substr(ranges[i].first, ranges[i].second)) << i;
  }
  messages.clear();
  EXPECT_EQ(pool->stats().bytes_in_use, 0u) << "the lease outlived its messages";
}

}  // namespace
}  // namespace dilattn::server
