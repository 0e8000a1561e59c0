#pragma once

// Helpers shared by the C++ tests: the conformance input generator, dtype-converted buffers,
// error metrics, poisoning.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/attention/attention.h"

namespace dilattn::testing {

// SplitMix64 as ../shared/conformance/README.md defines it, mapped to floats in [-1, 1) * scale.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t Next() {
    state_ += 0x9E3779B97F4A7C15ull;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  float NextFloat(float scale) {
    const float u = static_cast<float>(static_cast<double>(Next() >> 40) / 16777216.0 * 2 - 1);
    return u * scale;
  }

  // Uniform integer in [lo, hi].
  int64_t Uniform(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(Next() % static_cast<uint64_t>(hi - lo + 1));
  }

 private:
  uint64_t state_;
};

// Values held as raw bytes of one dtype, with fp32 access for building inputs and checking.
class TypedBuffer {
 public:
  TypedBuffer(attention::DType dtype, size_t count)
      : dtype_(dtype), count_(count), bytes_(count * attention::DTypeSize(dtype)) {}

  static TypedBuffer FromFloats(attention::DType dtype, const std::vector<float>& values) {
    TypedBuffer b(dtype, values.size());
    for (size_t i = 0; i < values.size(); ++i) b.Set(i, values[i]);
    return b;
  }

  void Set(size_t i, float v) { attention::StoreFromFloat(bytes_.data(), dtype_, i, v); }
  float Get(size_t i) const { return attention::LoadAsFloat(bytes_.data(), dtype_, i); }
  std::vector<float> ToFloats() const {
    std::vector<float> out(count_);
    for (size_t i = 0; i < count_; ++i) out[i] = Get(i);
    return out;
  }
  // Fills with NaN (or its bit pattern's closest kin for the narrow types) so that any element a
  // kernel fails to write shows up as NaN.
  void Poison() {
    for (size_t i = 0; i < count_; ++i) Set(i, std::numeric_limits<float>::quiet_NaN());
  }

  attention::ConstTensorRef cref() const {
    return {bytes_.data(), bytes_.size(), DeviceLoc::Host()};
  }
  attention::TensorRef ref() { return {bytes_.data(), bytes_.size(), DeviceLoc::Host()}; }
  void* data() { return bytes_.data(); }
  size_t bytes() const { return bytes_.size(); }
  size_t count() const { return count_; }
  attention::DType dtype() const { return dtype_; }

 private:
  attention::DType dtype_;
  size_t count_;
  std::vector<unsigned char> bytes_;
};

struct ErrorReport {
  double relative = 0;  // ||out - ref|| / ||ref||
  size_t nan_count = 0;
  bool ok(double tolerance) const { return nan_count == 0 && relative <= tolerance; }
};

template <typename Ref>
ErrorReport RelativeError(const std::vector<float>& out, const std::vector<Ref>& ref) {
  ErrorReport r;
  double diff = 0;
  double norm = 0;
  for (size_t i = 0; i < out.size() && i < ref.size(); ++i) {
    if (std::isnan(out[i]) || std::isinf(out[i])) {
      ++r.nan_count;
      continue;
    }
    const double d = static_cast<double>(out[i]) - static_cast<double>(ref[i]);
    diff += d * d;
    norm += static_cast<double>(ref[i]) * static_cast<double>(ref[i]);
  }
  if (out.size() != ref.size()) r.nan_count += out.size() > ref.size() ? out.size() - ref.size()
                                                                         : ref.size() - out.size();
  r.relative = norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
  return r;
}

// Tolerances of ../shared/conformance/README.md, by the dtype of the inputs and output.
inline double Tolerance(attention::DType dtype) {
  switch (dtype) {
    case attention::DType::kFloat32: return 1e-5;
    case attention::DType::kFloat16: return 2e-3;
    case attention::DType::kBFloat16: return 1e-2;
  }
  return 0;
}

}  // namespace dilattn::testing
