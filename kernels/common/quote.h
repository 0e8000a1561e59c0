#pragma once

// Text a client sent, echoed in an error message: quoted, with control and other non-printable
// bytes escaped, and cut after kMaxQuotedBytes, so that a hostile name or value can neither
// flood a reply or a log line nor carry control characters into them.

#include <cstddef>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace dilattn {

inline constexpr size_t kMaxQuotedBytes = 64;

inline std::string Quote(absl::string_view text) {
  if (text.size() <= kMaxQuotedBytes) {
    return absl::StrCat("'", absl::Utf8SafeCHexEscape(text), "'");
  }
  size_t cut = kMaxQuotedBytes;
  // Cut before a character, not inside its UTF-8 sequence.
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return absl::StrCat("'", absl::Utf8SafeCHexEscape(text.substr(0, cut)), "'... (",
                      text.size(), " bytes)");
}

}  // namespace dilattn
