#pragma once

// Element types of the attention tensors and exact scalar conversions (round to nearest even),
// shared by the CPU paths, the reference and the tests.

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include "absl/strings/string_view.h"

#include "kernels/attention/params.h"

namespace dilattn::attention {

constexpr size_t DTypeSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

constexpr absl::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
  }
  return "unknown";
}

inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: the value is mantissa * 2^-24, exact in fp32.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign != 0 ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t FloatToHalfBits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // inf stays inf, NaN stays a quiet NaN
    return sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u);
  }
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (magnitude < 0x38800000u) {
    // Below the smallest normal half (2^-14): the result is round(|f| * 2^24) units of 2^-24;
    // the scaling is exact and nearbyint rounds to even. 0x400 becomes the smallest normal.
    const float scaled = std::bit_cast<float>(magnitude) * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  magnitude += 0xfffu + ((magnitude >> 13) & 1u);  // round to nearest even at bit 13
  magnitude -= 0x38000000u;                        // rebias the exponent from 127 to 15
  return sign | static_cast<uint16_t>(magnitude >> 13);
}

inline float BFloat16BitsToFloat(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

inline uint16_t FloatToBFloat16Bits(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

// Element i of a buffer of type t, widened to fp32.
inline float LoadAsFloat(const void* data, DType t, size_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(data)[i];
    case DType::kFloat16: return HalfBitsToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kBFloat16: return BFloat16BitsToFloat(static_cast<const uint16_t*>(data)[i]);
  }
  return NAN;
}

inline void StoreFromFloat(void* data, DType t, size_t i, float value) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(data)[i] = value; return;
    case DType::kFloat16: static_cast<uint16_t*>(data)[i] = FloatToHalfBits(value); return;
    case DType::kBFloat16: static_cast<uint16_t*>(data)[i] = FloatToBFloat16Bits(value); return;
  }
}

}  // namespace dilattn::attention
