#pragma once

// One-line log records on stderr, as text ("2026-11-26T01:02:03.456Z I message") or as JSON
// objects ({"time":"2026-11-26T01:02:03.456Z","severity":"INFO","message":"..."}, the fields log
// collectors such as Cloud Logging, Loki or Elasticsearch take as they are). Thread-safe (one
// write per record).

#include <string>

#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace dilattn::server {

enum class LogLevel { kInfo, kWarning, kError };
enum class LogFormat { kText, kJson };

// Every record from now on; text until set. Any thread.
void SetLogFormat(LogFormat format);
void LogLine(LogLevel level, absl::string_view message);
// `text` as the inside of a JSON string: quotes, backslashes and control characters escaped, and
// each byte that is not part of valid UTF-8 replaced by U+FFFD, so that a record stays valid JSON
// whatever a message quotes (a client's model name, say).
std::string JsonEscape(absl::string_view text);

template <typename... Args>
void LogInfo(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogLine(LogLevel::kInfo, absl::StrFormat(format, args...));
}
template <typename... Args>
void LogWarning(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogLine(LogLevel::kWarning, absl::StrFormat(format, args...));
}
template <typename... Args>
void LogError(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogLine(LogLevel::kError, absl::StrFormat(format, args...));
}

}  // namespace dilattn::server
