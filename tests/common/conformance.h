#pragma once

// Reads ../shared/conformance (cases.json and the expected outputs) and builds each case's
// inputs from its seed. The directory comes from DILATTN_CONFORMANCE_DIR, which CTest sets.

#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention/attention.h"

namespace dilattn::testing {

struct ConformanceCase {
  std::string name;
  int64_t batch = 0, seq_len = 0, heads = 0, head_dim = 0;
  attention::AttentionOptions options;
  uint64_t seed = 0;
  float input_scale = 1;
  std::string output_file;   // empty for expect_error cases
  std::string expect_error;  // e.g. "INVALID_ARGUMENT"
};

std::string ConformanceDir();
absl::StatusOr<std::vector<ConformanceCase>> LoadConformanceCases();

// Q, K, V as fp32, each (B, N, H, D), drawn as the README specifies.
struct CaseInputs {
  std::vector<float> q, k, v;
};
CaseInputs MakeCaseInputs(const ConformanceCase& c);

absl::StatusOr<std::vector<float>> LoadExpectedOutput(const ConformanceCase& c);

// GoogleTest prints parameters with this instead of their bytes.
inline void PrintTo(const ConformanceCase& c, std::ostream* os) { *os << c.name; }

}  // namespace dilattn::testing
