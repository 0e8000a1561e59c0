#include "kernels/common/quote.h"

#include <string>

#include "gtest/gtest.h"

namespace dilattn {
namespace {

TEST(Quote, PlainTextIsQuotedAsIs) {
  EXPECT_EQ(Quote("segment_lengths"), "'segment_lengths'");
  EXPECT_EQ(Quote(""), "''");
  EXPECT_EQ(Quote("caf\xc3\xa9"), "'caf\xc3\xa9'");  // UTF-8 stays readable
}

TEST(Quote, ControlBytesAreEscaped) {
  EXPECT_EQ(Quote(std::string("FP32\0\n\x1b", 7)), "'FP32\\x00\\n\\x1b'");
  EXPECT_EQ(Quote("it's"), "'it\\'s'");
}

TEST(Quote, LongTextIsCutAndItsLengthGiven) {
  const std::string q = Quote(std::string(5000, 'x'));
  EXPECT_EQ(q, "'" + std::string(kMaxQuotedBytes, 'x') + "'... (5000 bytes)");
  // A cut never splits a UTF-8 sequence: 63 ASCII bytes, then a two-byte character across the
  // limit.
  const std::string text = std::string(kMaxQuotedBytes - 1, 'a') + "\xc3\xa9" + "tail";
  EXPECT_EQ(Quote(text),
            "'" + std::string(kMaxQuotedBytes - 1, 'a') + "'... (" +
                std::to_string(text.size()) + " bytes)");
}

}  // namespace
}  // namespace dilattn
