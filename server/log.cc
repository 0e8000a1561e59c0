#include "server/log.h"

#include <unistd.h>

#include <atomic>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace dilattn::server {
namespace {

std::atomic<LogFormat> log_format{LogFormat::kText};

// The length of the valid UTF-8 sequence at the start of `s` (non-empty), 0 if there is none:
// no overlong forms, no surrogates, nothing past U+10FFFF.
size_t Utf8Length(absl::string_view s) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  const uint8_t b0 = byte(0);
  if (b0 < 0x80) return 1;
  size_t n = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // the second byte's range
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (s.size() < n || byte(1) < lo || byte(1) > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  }
  return n;
}

}  // namespace

void SetLogFormat(LogFormat format) { log_format.store(format); }

std::string JsonEscape(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  while (!text.empty()) {
    const char c = text.front();
    const size_t n = Utf8Length(text);
    if (n == 0) {
      out += "\\ufffd";
      text.remove_prefix(1);
      continue;
    }
    if (n > 1) {
      out.append(text.data(), n);
    } else if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (static_cast<uint8_t>(c) < 0x20 || c == 0x7F) {
      out += absl::StrFormat("\\u%04x", static_cast<uint8_t>(c));
    } else {
      out.push_back(c);
    }
    text.remove_prefix(n);
  }
  return out;
}

void LogLine(LogLevel level, absl::string_view message) {
  const std::string time =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone());
  std::string line;
  if (log_format.load() == LogFormat::kJson) {
    const char* severity = level == LogLevel::kInfo      ? "INFO"
                           : level == LogLevel::kWarning ? "WARNING"
                                                         : "ERROR";
    line = absl::StrCat("{\"time\":\"", time, "\",\"severity\":\"", severity, "\",\"message\":\"",
                        JsonEscape(message), "\"}\n");
  } else {
    const char tag = level == LogLevel::kInfo ? 'I' : level == LogLevel::kWarning ? 'W' : 'E';
    line = absl::StrCat(time, " ", absl::string_view(&tag, 1), " ", message, "\n");
  }
  // One write(2) per record keeps lines from different threads whole.
  const ssize_t unused = ::write(STDERR_FILENO, line.data(), line.size());
  (void)unused;
}

}  // namespace dilattn::server
