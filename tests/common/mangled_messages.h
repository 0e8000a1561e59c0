#pragma once

// Hostile bytes for the tests of the server's own message parsers (server/grpc/wire.h), which
// compare them with protobuf's parser.

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {

inline size_t Below(SplitMix64& rng, size_t n) { return n == 0 ? 0 : rng.Next() % n; }

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

// `bytes` as a received message: cut into slices of random lengths, as gRPC hands them over.
inline grpc::ByteBuffer AsSlicedMessage(SplitMix64& rng, const std::string& bytes) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size();) {
    const size_t n =
        std::min<size_t>(1 + Below(rng, std::max<size_t>(1, bytes.size() / 3)), bytes.size() - at);
    slices.emplace_back(bytes.data() + at, n);
    at += n;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

struct ParseAgreement {
  int accepted = 0;              // by both
  int refused = 0;               // by protobuf, and so by ours
  int refused_by_ours_only = 0;  // groups in unknown fields, which proto3 messages never carry
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
