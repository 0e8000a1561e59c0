#pragma once

// Hostile bytes for the tests of the server's own message parsers (server/grpc/wire.h), which
// compare them with protobuf's parser.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {

// Uniform in [0, n), n >= 1, as a size.
inline size_t Below(SplitMix64& rng, size_t n) {
  return static_cast<size_t>(rng.Uniform(0, static_cast<int64_t>(n) - 1));
}

inline std::string RandomBytes(SplitMix64& rng, size_t n) {
  std::string out(n, '\0');
  for (char& b : out) b = static_cast<char>(Below(rng, 256));
  return out;
}

// Up to three edits of a valid message: a byte changed, a few erased, one inserted, or the rest
// cut off.
inline void Mangle(SplitMix64& rng, std::string* bytes) {
  for (size_t edits = Below(rng, 4); edits > 0 && !bytes->empty(); --edits) {
    const size_t at = Below(rng, bytes->size());
    switch (Below(rng, 4)) {
      case 0:
        (*bytes)[at] = static_cast<char>(Below(rng, 256));
        break;
      case 1:
        bytes->erase(at, 1 + Below(rng, 6));
        break;
      case 2:
        bytes->insert(at, 1, static_cast<char>(Below(rng, 256)));
        break;
      default:
        bytes->resize(at);
        break;
    }
  }
}

// `bytes` as a received message, cut into slices of the lengths `next_length()` draws (0 gives
// an empty slice; the last is cut to what is left).
template <typename NextLength>
grpc::ByteBuffer AsSlicedMessage(const std::string& bytes, NextLength next_length) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size();) {
    const size_t n = std::min<size_t>(next_length(), bytes.size() - at);
    slices.emplace_back(bytes.data() + at, n);
    at += n;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// `bytes` as a received message: cut into slices of random lengths, as gRPC hands them over.
inline grpc::ByteBuffer AsSlicedMessage(SplitMix64& rng, const std::string& bytes) {
  return AsSlicedMessage(bytes,
                         [&] { return 1 + Below(rng, std::max<size_t>(1, bytes.size() / 3)); });
}

// v as a varint of at least min_bytes bytes (longer than needed: continuation bits on zeros).
inline std::string Varint(uint64_t v, size_t min_bytes = 1) {
  std::string out;
  do {
    uint8_t b = v & 0x7f;
    v >>= 7;
    if (v != 0 || out.size() + 1 < min_bytes) b |= 0x80;
    out.push_back(static_cast<char>(b));
  } while (v != 0 || out.size() < min_bytes);
  return out;
}

// Messages at the edges of protobuf's wire format around the length-delimited field `field`
// holding `payload`: its tag and length prefix in one to eleven bytes, bits past 32 in a five-byte
// tag or length, lengths past INT32_MAX, field numbers 0 and 2^29, an unknown field of every wire
// type, and groups. Whether each is well formed is protobuf's to say.
inline std::vector<std::string> EdgeEncodings(int field, const std::string& payload) {
  const uint64_t tag = (static_cast<uint64_t>(field) << 3) | 2;
  const std::string len = Varint(payload.size());
  std::vector<std::string> out;
  for (size_t n = 1; n <= 11; ++n) {
    out.push_back(Varint(tag, n) + len + payload);
    out.push_back(Varint(tag) + Varint(payload.size(), n) + payload);
  }
  for (uint64_t high : {uint64_t{1} << 32, uint64_t{3} << 32, uint64_t{1} << 31}) {
    out.push_back(Varint(tag + high) + len + payload);
    out.push_back(Varint(tag) + Varint(payload.size() + high) + payload);
  }
  out.push_back(Varint(2) + len + payload);                        // field 0
  out.push_back(Varint((uint64_t{1} << 32) - 6) + len + payload);  // field 2^29 - 1
  out.push_back(Varint((uint64_t{1} << 32) + 2) + len + payload);  // field 2^29
  for (int wire = 0; wire < 8; ++wire) {
    out.push_back(Varint((99 << 3) | wire) + Varint(1) + std::string(8, 'a') + Varint(tag) + len +
                  payload);
  }
  // Groups, which protobuf skips as unknown fields: empty, holding fields and a nested group,
  // ended by another field's end, never ended, a stray end, and nested 100 and 101 deep.
  const std::string start = Varint((99 << 3) | 3), end = Varint((99 << 3) | 4);
  out.push_back(start + end + Varint(tag) + len + payload);
  out.push_back(start + Varint(8) + Varint(300) + Varint((2 << 3) | 2) + Varint(2) + "xy" +
                Varint((5 << 3) | 3) + Varint((5 << 3) | 4) + end + Varint(tag) + len + payload);
  out.push_back(start + Varint((98 << 3) | 4) + Varint(tag) + len + payload);
  out.push_back(Varint(tag) + len + payload + start);
  out.push_back(end + Varint(tag) + len + payload);
  for (int depth : {100, 101}) {
    std::string nested;
    for (int i = 0; i < depth; ++i) nested += start;
    for (int i = 0; i < depth; ++i) nested += end;
    out.push_back(nested + Varint(tag) + len + payload);
  }
  out.push_back(Varint(tag) + Varint(uint64_t{1} << 31) + payload);
  out.push_back(Varint(tag) + Varint(uint64_t{1} << 63) + payload);
  out.push_back(Varint(field << 3) + std::string(10, '\x80') + "\x01");  // an 11-byte varint
  return out;
}

struct ParseAgreement {
  int accepted = 0;              // by both
  int refused = 0;               // by protobuf, and so by ours
  int refused_by_ours_only = 0;  // where ours is stricter than protobuf
};

// `rounds` mangled copies of the `valid` messages, each parsed by `parse` (ours, from its slices:
// an absl::StatusOr) and by protobuf into a `Theirs`. Where protobuf refuses, ours must refuse
// with INVALID_ARGUMENT; where both accept, `agree(ours, theirs, round)` compares the results.
template <class Theirs, class Parse, class Agree>
ParseAgreement CheckAgainstProtobuf(SplitMix64& rng, const std::vector<std::string>& valid,
                                    int rounds, Parse parse, Agree agree) {
  ParseAgreement n;
  for (int round = 0; round < rounds; ++round) {
    std::string bytes = valid[Below(rng, valid.size())];
    Mangle(rng, &bytes);
    auto ours = parse(AsSlicedMessage(rng, bytes));
    Theirs theirs;
    if (!theirs.ParseFromString(bytes)) {
      EXPECT_EQ(ours.status().code(), absl::StatusCode::kInvalidArgument) << "round " << round;
      ++n.refused;
    } else if (!ours.ok()) {
      ++n.refused_by_ours_only;
    } else {
      ++n.accepted;
      agree(*ours, theirs, round);
    }
  }
  return n;
}

}  // namespace dilattn::testing
