#include <cmath>
#include <cstdint>
#include <limits>

#include "gtest/gtest.h"
#include "kernels/attention/dtype.h"

namespace dilattn::attention {
namespace {

TEST(DType, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = HalfBitsToFloat(static_cast<uint16_t>(bits));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfBitsToFloat(FloatToHalfBits(f))));
      continue;
    }
    ASSERT_EQ(FloatToHalfBits(f), bits) << "bits " << bits << " value " << f;
  }
}

TEST(DType, HalfRoundsToNearestEven) {
  EXPECT_EQ(FloatToHalfBits(1.0f + 0x1p-11f), 0x3c00);        // tie, even stays
  EXPECT_EQ(FloatToHalfBits(1.0f + 3 * 0x1p-11f), 0x3c02);    // tie, odd rounds up
  EXPECT_EQ(FloatToHalfBits(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalfBits(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToHalfBits(65520.0f), 0x7c00);                // rounds to inf
  EXPECT_EQ(FloatToHalfBits(-0x1p-24f), 0x8001);               // smallest subnormal
  EXPECT_EQ(FloatToHalfBits(0x1p-26f), 0x0000);                // below half of it
  EXPECT_EQ(FloatToHalfBits(0x1p-14f - 0x1p-25f), 0x0400);    // rounds up into the normals
}

TEST(DType, BFloat16) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = BFloat16BitsToFloat(static_cast<uint16_t>(bits));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBFloat16Bits(f), bits);
  }
  EXPECT_EQ(FloatToBFloat16Bits(1.0f + 0x1p-8f), 0x3f80);      // tie to even
  EXPECT_EQ(FloatToBFloat16Bits(1.0f + 3 * 0x1p-8f), 0x3f82);
  EXPECT_TRUE(std::isnan(BFloat16BitsToFloat(
      FloatToBFloat16Bits(std::numeric_limits<float>::quiet_NaN()))));
}

}  // namespace
}  // namespace dilattn::attention
