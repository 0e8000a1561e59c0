// libFuzzer's entry for one target, chosen at build time (DILATTN_FUZZ_TARGET: InferRequest or
// AttendRequest). With DILATTN_FUZZ_WRITE_SEEDS=dir it writes the target's seeds into dir and
// exits, to start a corpus.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "tests/fuzz/fuzz_targets.h"

#define DILATTN_CONCAT_INNER(a, b) a##b
#define DILATTN_CONCAT(a, b) DILATTN_CONCAT_INNER(a, b)

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* dir = std::getenv("DILATTN_FUZZ_WRITE_SEEDS");
  if (dir == nullptr) return 0;
  const auto seeds = dilattn::fuzz::DILATTN_CONCAT(DILATTN_FUZZ_TARGET, Seeds)();
  for (size_t i = 0; i < seeds.size(); ++i) {
    const std::string path = absl::StrCat(dir, "/seed-", i);
    FILE* f = std::fopen(path.c_str(), "wb");
    const std::string& bytes = seeds[i].input;
    if (f == nullptr || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) {
      std::perror(path.c_str());
      std::exit(1);
    }
    std::fclose(f);
  }
  std::exit(0);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  dilattn::fuzz::DILATTN_CONCAT(DILATTN_FUZZ_TARGET, Target)(data, size);
  return 0;
}
