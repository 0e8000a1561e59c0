#pragma once

// A reader for the safetensors format (an 8-byte little-endian header length, a JSON header
// mapping names to {dtype, shape, data_offsets}, then the data). The file comes from an operator,
// not a caller, but it is still parsed as hostile: every length, offset and shape product is
// checked before use, and every failure is INVALID_ARGUMENT naming the file and the problem.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dilattn::multihead {

struct SafetensorsEntry {
  std::string dtype;            // "F32", "F16", "BF16", ... as the file says
  std::vector<int64_t> shape;   // empty for a scalar
  uint64_t begin = 0, end = 0;  // byte range within the data section
};

class SafetensorsFile {
 public:
  // Reads and parses the whole file; `path` names it in messages.
  static absl::StatusOr<SafetensorsFile> Read(const std::string& path);
  // Parses bytes already in memory; `source` names them in messages.
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes, std::string source);

  const std::string& source() const { return source_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* Find(absl::string_view name) const;

  // The tensor `name` as fp32 values (F32, F16 and BF16 are widened exactly), after checking its
  // shape against `shape`. NOT_FOUND when it is absent; INVALID_ARGUMENT for any other mismatch.
  absl::StatusOr<std::vector<float>> ReadFloat(absl::string_view name,
                                               const std::vector<int64_t>& shape) const;

 private:
  std::string source_;
  std::string bytes_;
  size_t data_begin_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
};

}  // namespace dilattn::multihead
