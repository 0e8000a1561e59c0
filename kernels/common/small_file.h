#pragma once

// The text of a file that is small by nature (a PEM certificate or key, say), read with a cap:
// a path that names /dev/zero, or a FIFO's endless writer, would otherwise be read until memory
// ran out.

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace dilattn {

inline constexpr size_t kMaxSmallFileBytes = size_t{1} << 20;

// INVALID_ARGUMENT "<what> <path>: cannot be read (<errno text>)" or "... larger than 1 MiB".
inline absl::StatusOr<std::string> ReadSmallFile(absl::string_view what, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", path, ": cannot be read (", std::strerror(errno), ")"));
  }
  std::string text(kMaxSmallFileBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  if (text.size() > kMaxSmallFileBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", path, ": larger than ", kMaxSmallFileBytes >> 20, " MiB"));
  }
  return text;
}

}  // namespace dilattn
