// Log records as text and as JSON: one line each, and valid JSON whatever the message holds.

#include "server/log.h"

#include <string>

#include "gtest/gtest.h"

namespace dilattn::server {
namespace {

std::string Record(LogFormat format, LogLevel level, absl::string_view message) {
  SetLogFormat(format);
  ::testing::internal::CaptureStderr();
  LogLine(level, message);
  std::string out = ::testing::internal::GetCapturedStderr();
  SetLogFormat(LogFormat::kText);
  return out;
}

TEST(Log, TextRecordsAreOneLine) {
  const std::string line = Record(LogFormat::kText, LogLevel::kWarning, "pool near its cap");
  ASSERT_EQ(line.size(), 24 + 3 + 17 + 1) << line;  // time, " W ", message, newline
  EXPECT_EQ(line.substr(10, 1), "T");
  EXPECT_EQ(line.substr(23), "Z W pool near its cap\n");
}

TEST(Log, JsonRecordsCarryTimeSeverityAndMessage) {
  const std::string line = Record(LogFormat::kJson, LogLevel::kError, "cuda:0: \"trap\"\n");
  ASSERT_EQ(line.rfind("{\"time\":\"", 0), 0u) << line;
  EXPECT_EQ(line.substr(9 + 24),
            "\",\"severity\":\"ERROR\",\"message\":\"cuda:0: \\\"trap\\\"\\n\"}\n")
      << line;
  EXPECT_NE(Record(LogFormat::kJson, LogLevel::kInfo, "x").find("\"severity\":\"INFO\""),
            std::string::npos);
  EXPECT_NE(Record(LogFormat::kJson, LogLevel::kWarning, "x").find("\"severity\":\"WARNING\""),
            std::string::npos);
}

TEST(Log, JsonEscapeKeepsUtf8AndReplacesWhatIsNot) {
  EXPECT_EQ(JsonEscape("a\\b\"c\td\x01\x7f"), "a\\\\b\\\"c\\u0009d\\u0001\\u007f");
  EXPECT_EQ(JsonEscape("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  // A lone continuation byte, a truncated sequence, an overlong form, a surrogate, past U+10FFFF.
  EXPECT_EQ(JsonEscape("\x80"), "\\ufffd");
  EXPECT_EQ(JsonEscape("ab\xe2\x82"), "ab\\ufffd\\ufffd");
  EXPECT_EQ(JsonEscape("\xc0\xaf"), "\\ufffd\\ufffd");
  EXPECT_EQ(JsonEscape("\xed\xa0\x80"), "\\ufffd\\ufffd\\ufffd");
  EXPECT_EQ(JsonEscape("\xf4\x90\x80\x80"), "\\ufffd\\ufffd\\ufffd\\ufffd");
  EXPECT_EQ(JsonEscape(std::string("a\0b", 3)), "a\\u0000b");
}

}  // namespace
}  // namespace dilattn::server
