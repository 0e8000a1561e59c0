#pragma once

#include <string>

namespace dilattn {

// Where a buffer lives. Every buffer and every backend carries one, so a host pointer can never
// reach a device kernel unnoticed (defect 11).
struct DeviceLoc {
  enum class Kind : unsigned char { kHost, kCuda };

  Kind kind = Kind::kHost;
  int ordinal = 0;

  static DeviceLoc Host() { return {Kind::kHost, 0}; }
  static DeviceLoc Cuda(int ordinal) { return {Kind::kCuda, ordinal}; }

  bool is_host() const { return kind == Kind::kHost; }
  std::string ToString() const {
    return kind == Kind::kHost ? std::string("host") : "cuda:" + std::to_string(ordinal);
  }
  friend bool operator==(const DeviceLoc&, const DeviceLoc&) = default;
};

}  // namespace dilattn
