#pragma once

// Fuzz targets over what a client controls: the bytes of a ModelInferRequest and of a native
// stream's AttendRequest. Each takes any bytes and checks, beyond not crashing, that the
// server's own parser agrees with protobuf's and that whatever it refuses is refused with a
// status naming the problem. A broken check aborts with a message. libFuzzer drives them
// (libfuzzer_main.cc, a clang build); corpus_test.cc replays the committed corpus and seeded
// mutations of it in every build.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dilattn::fuzz {

// What became of an input: not a message at all (refused by the parser of the bytes), a message
// the server refuses (by name), or one it accepts.
enum class Outcome { kMalformed, kRefused, kAccepted };

// Input layout of both targets: the first byte chooses how the rest is cut into the slices of a
// received message; the rest is the message.
Outcome InferRequestTarget(const uint8_t* data, size_t size);
Outcome AttendRequestTarget(const uint8_t* data, size_t size);

// A whole native stream through a running server (loopback gRPC, CPU engine): the input is a
// sequence of messages, each a 2-byte little-endian length and an AttendRequest's bytes (those
// protobuf cannot parse are left out). The stream must end as the protocol says: OK exactly when
// the header is accepted and Q, K and V arrive whole, in order, without gaps or overruns, with
// every output token sent once, in order; otherwise an error naming the problem, never a hang.
// kMalformed here means the header itself is refused; kRefused, a stream refused later.
Outcome StreamTarget(const uint8_t* data, size_t size);

// Messages in the targets' input layout, as a corpus's start, with what each must come to.
struct Seed {
  std::string input;
  Outcome expect;
};
std::vector<Seed> InferRequestSeeds();
std::vector<Seed> AttendRequestSeeds();
std::vector<Seed> StreamSeeds();

}  // namespace dilattn::fuzz
