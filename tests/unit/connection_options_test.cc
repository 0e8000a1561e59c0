// The connection flags' ranges and the channel arguments they become; what gRPC does with them
// (pings refused or allowed, connections aged out under load) is tests/e2e/test_connections.py's.

#include "server/grpc/connection_options.h"

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace dilattn::server {
namespace {

std::map<std::string, int> Args(const GrpcConnectionOptions& o) {
  std::map<std::string, int> out;
  for (const auto& [name, value] : GrpcConnectionArgs(o)) {
    EXPECT_TRUE(out.emplace(name, value).second) << name << " given twice";
  }
  return out;
}

// The arguments, each with its value, and nothing else: no maximum connection age, whose
// GOAWAY loses requests with this gRPC (connection_options.h says).
using ArgMap = std::map<std::string, int>;
ArgMap Expected(int time, int timeout, int permit, int pings, int interval, int strikes) {
  return {{"grpc.keepalive_time_ms", time},
          {"grpc.keepalive_timeout_ms", timeout},
          {"grpc.keepalive_permit_without_calls", permit},
          {"grpc.http2.max_pings_without_data", pings},
          {"grpc.http2.min_ping_interval_without_data_ms", interval},
          {"grpc.http2.max_ping_strikes", strikes}};
}

TEST(GrpcConnectionOptions, DefaultsAreGrpcsOwn) {
  const GrpcConnectionOptions o;
  EXPECT_TRUE(ValidateGrpcConnectionOptions(o).ok());
  EXPECT_EQ(Args(o), Expected(7200000, 20000, 0, 2, 300000, 2));
}

TEST(GrpcConnectionOptions, EachValueReachesItsArgument) {
  GrpcConnectionOptions o;
  o.keepalive_time_ms = 10000;
  o.keepalive_timeout_ms = 3000;
  o.keepalive_permit_without_calls = true;
  o.http2_max_pings_without_data = 0;
  o.http2_min_recv_ping_interval_without_data_ms = 5000;
  o.http2_max_ping_strikes = 0;
  ASSERT_TRUE(ValidateGrpcConnectionOptions(o).ok());
  EXPECT_EQ(Args(o), Expected(10000, 3000, 1, 0, 5000, 0));
}

TEST(GrpcConnectionOptions, OutOfRangeValuesAreRefusedByFlag) {
  struct Case {
    const char* flag;
    void (*set)(GrpcConnectionOptions*);
  };
  const Case cases[] = {
      {"--grpc-keepalive-time", [](GrpcConnectionOptions* o) { o->keepalive_time_ms = 0; }},
      {"--grpc-keepalive-timeout", [](GrpcConnectionOptions* o) { o->keepalive_timeout_ms = -1; }},
      {"--grpc-http2-max-pings-without-data",
       [](GrpcConnectionOptions* o) { o->http2_max_pings_without_data = -1; }},
      {"--grpc-http2-min-recv-ping-interval-without-data",
       [](GrpcConnectionOptions* o) { o->http2_min_recv_ping_interval_without_data_ms = -5; }},
      {"--grpc-http2-max-ping-strikes",
       [](GrpcConnectionOptions* o) { o->http2_max_ping_strikes = -1; }},
      // gRPC takes every value as an int: past INT_MAX it would wrap.
      {"--grpc-http2-min-recv-ping-interval-without-data",
       [](GrpcConnectionOptions* o) {
         o->http2_min_recv_ping_interval_without_data_ms = int64_t{1} << 31;
       }},
      {"--grpc-keepalive-time",
       [](GrpcConnectionOptions* o) { o->keepalive_time_ms = int64_t{1} << 40; }},
  };
  for (const Case& c : cases) {
    GrpcConnectionOptions o;
    c.set(&o);
    const absl::Status s = ValidateGrpcConnectionOptions(o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.flag;
    EXPECT_TRUE(absl::StrContains(s.message(), c.flag)) << s.message();
  }
}

TEST(GrpcConnectionOptions, TheLimitsThemselvesAreAccepted) {
  GrpcConnectionOptions o;
  o.keepalive_time_ms = 1;
  o.keepalive_timeout_ms = 2147483647;
  o.http2_min_recv_ping_interval_without_data_ms = 0;
  EXPECT_TRUE(ValidateGrpcConnectionOptions(o).ok());
}

}  // namespace
}  // namespace dilattn::server
