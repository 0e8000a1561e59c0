#include "server/grpc/connection_options.h"

#include <climits>

#include "absl/strings/str_cat.h"
#include "grpc/grpc.h"

namespace dilattn::server {
namespace {

absl::Status InRange(const char* flag, int64_t value, int64_t low, const char* meaning) {
  if (value >= low && value <= INT_MAX) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("--", flag, " must be in [", low, ", ", INT_MAX, "]", meaning, ", got ", value));
}

}  // namespace

absl::Status ValidateGrpcConnectionOptions(const GrpcConnectionOptions& o) {
  for (absl::Status s : {
           InRange("grpc-keepalive-time", o.keepalive_time_ms, 1, " ms"),
           InRange("grpc-keepalive-timeout", o.keepalive_timeout_ms, 1, " ms"),
           InRange("grpc-http2-max-pings-without-data", o.http2_max_pings_without_data, 0,
                   " (0: no limit)"),
           InRange("grpc-http2-min-recv-ping-interval-without-data",
                   o.http2_min_recv_ping_interval_without_data_ms, 0, " ms"),
           InRange("grpc-http2-max-ping-strikes", o.http2_max_ping_strikes, 0, " (0: no limit)"),
       }) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

std::vector<std::pair<std::string, int>> GrpcConnectionArgs(const GrpcConnectionOptions& o) {
  // Validated: every value fits an int.
  return {
      {GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(o.keepalive_time_ms)},
      {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(o.keepalive_timeout_ms)},
      {GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, o.keepalive_permit_without_calls ? 1 : 0},
      {GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, static_cast<int>(o.http2_max_pings_without_data)},
      {GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
       static_cast<int>(o.http2_min_recv_ping_interval_without_data_ms)},
      {GRPC_ARG_HTTP2_MAX_PING_STRIKES, static_cast<int>(o.http2_max_ping_strikes)},
  };
}

}  // namespace dilattn::server
