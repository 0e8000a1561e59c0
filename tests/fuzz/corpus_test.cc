// The fuzz targets in every build, without libFuzzer: each file of the committed corpus
// (tests/fuzz/corpus/<target>, what local fuzzing kept, findings included), the seeds, and
// seeded random edits of both.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/common/mangled_messages.h"
#include "tests/fuzz/fuzz_targets.h"

#ifndef DILATTN_FUZZ_CORPUS_DIR
#error "DILATTN_FUZZ_CORPUS_DIR names tests/fuzz/corpus"
#endif

namespace dilattn::fuzz {
namespace {

std::vector<std::string> Corpus(const std::string& target) {
  std::vector<std::string> out;
  const std::filesystem::path dir = std::filesystem::path(DILATTN_FUZZ_CORPUS_DIR) / target;
  if (!std::filesystem::is_directory(dir)) return out;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(entry.path(), std::ios::binary);
    out.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return out;
}

using Target = Outcome (*)(const uint8_t*, size_t);

Outcome Run(Target target, const std::string& input) {
  return target(reinterpret_cast<const uint8_t*>(input.data()), input.size());
}

// Every corpus file as it is, every seed with the outcome it must have (so the targets' checks
// of accepted requests run in every build), then `edits` random edits of both (a new slicing
// byte and up to three changes each), from a fixed seed.
void Replay(Target target, const std::vector<Seed>& seeds, std::vector<std::string> inputs,
            int edits) {
  int outcomes[3] = {};
  for (const std::string& input : inputs) ++outcomes[static_cast<int>(Run(target, input))];
  for (size_t i = 0; i < seeds.size(); ++i) {
    const Outcome o = Run(target, seeds[i].input);
    EXPECT_EQ(o, seeds[i].expect) << "seed " << i;
    ++outcomes[static_cast<int>(o)];
    inputs.push_back(seeds[i].input);
  }
  testing::SplitMix64 rng(20261127);
  for (int i = 0; i < edits; ++i) {
    std::string input = inputs[testing::Below(rng, inputs.size())];
    if (input.empty()) continue;
    std::string message = input.substr(1);
    testing::Mangle(rng, &message);
    Run(target, std::string(1, static_cast<char>(testing::Below(rng, 256))) + message);
  }
  // The corpus reaches each outcome (a corpus of one kind would test little).
  for (int o = 0; o < 3; ++o) EXPECT_GT(outcomes[o], 0) << "outcome " << o;
}

TEST(FuzzCorpus, InferRequests) {
  const std::vector<std::string> corpus = Corpus("infer_request");
  EXPECT_FALSE(corpus.empty()) << "no corpus under " << DILATTN_FUZZ_CORPUS_DIR;
  Replay(&InferRequestTarget, InferRequestSeeds(), corpus, 3000);
}

TEST(FuzzCorpus, AttendRequests) {
  const std::vector<std::string> corpus = Corpus("attend_request");
  EXPECT_FALSE(corpus.empty()) << "no corpus under " << DILATTN_FUZZ_CORPUS_DIR;
  Replay(&AttendRequestTarget, AttendRequestSeeds(), corpus, 3000);
}

TEST(FuzzCorpus, Streams) {
  const std::vector<std::string> corpus = Corpus("stream");
  EXPECT_FALSE(corpus.empty()) << "no corpus under " << DILATTN_FUZZ_CORPUS_DIR;
  Replay(&StreamTarget, StreamSeeds(), corpus, 300);
}

}  // namespace
}  // namespace dilattn::fuzz
