#ifndef DILATTN_SERVER_GRPC_CONNECTION_OPTIONS_H_
#define DILATTN_SERVER_GRPC_CONNECTION_OPTIONS_H_

// How the gRPC port treats its HTTP/2 connections: keepalive pings and the ping policy it
// enforces on clients. The flags that set them carry Triton's names, units (milliseconds) and
// defaults, so that a Triton deployment's settings carry over.
// There is deliberately no maximum connection age: with this gRPC (Debian 12's 1.51) the server's
// GOAWAY for it failed requests under load and lost computed responses (docs/BENCHMARKS.md,
// "A maximum connection age").

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace dilattn::server {

// The defaults are gRPC's own (and Triton's), so that a server started without these flags
// behaves as before they existed.
struct GrpcConnectionOptions {
  // --grpc-keepalive-time: the server pings a connection silent this long, and
  // --grpc-keepalive-timeout: closes it when no answer comes within this, so that connections
  // a NAT or load balancer dropped without a word stop holding their calls.
  int64_t keepalive_time_ms = 7200000;
  int64_t keepalive_timeout_ms = 20000;
  // --grpc-keepalive-permit-without-calls: pings are allowed (sent, and accepted from clients)
  // on connections with no call open.
  bool keepalive_permit_without_calls = false;
  // --grpc-http2-max-pings-without-data: pings the server sends with no data in between
  // (0: no limit).
  int64_t http2_max_pings_without_data = 2;
  // --grpc-http2-min-recv-ping-interval-without-data: a client ping sooner than this after the
  // last, with no data sent in between, is a strike; past --grpc-http2-max-ping-strikes strikes
  // the connection is closed (GOAWAY "too_many_pings"; 0 strikes: no limit). A client whose
  // keepalive time is shorter than this interval has its connections closed: match them.
  int64_t http2_min_recv_ping_interval_without_data_ms = 300000;
  int64_t http2_max_ping_strikes = 2;
};

// INVALID_ARGUMENT naming the flag when a value is out of its range (gRPC takes them as ints).
absl::Status ValidateGrpcConnectionOptions(const GrpcConnectionOptions& options);

// The gRPC channel arguments (name, value) that carry `options` to the server builder.
std::vector<std::pair<std::string, int>> GrpcConnectionArgs(const GrpcConnectionOptions& options);

}  // namespace dilattn::server

#endif  // DILATTN_SERVER_GRPC_CONNECTION_OPTIONS_H_
