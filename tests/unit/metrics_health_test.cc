// The HTTP health paths on the metrics port: answers that follow the checks set, and none of the
// server's once RemoveSources has run (the server is being torn down).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/metrics.h"

namespace dilattn::server {
namespace {

// The status line and body of `method path` on 127.0.0.1:`port`, over a fresh connection.
std::string Http(int port, const std::string& method, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "connect failed";
  }
  const std::string request =
      absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return "write failed";
  }
  std::string reply;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) reply.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t line_end = reply.find("\r\n");
  const size_t body = reply.find("\r\n\r\n");
  if (line_end == std::string::npos || body == std::string::npos) return reply;
  return absl::StrCat(reply.substr(0, line_end), "|", reply.substr(body + 4));
}

TEST(MetricsHealth, AnswersFollowTheChecksUntilTheSourcesGo) {
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create("127.0.0.1:0");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  const int port = (*metrics)->port();
  ASSERT_GT(port, 0);
  EXPECT_EQ(Http(port, "GET", "/v2/health/ready"), "HTTP/1.1 400 Bad Request|not ready\n");

  std::atomic<bool> live{true}, ready{false};
  (*metrics)->SetHealth([&] { return live.load(); }, [&] { return ready.load(); });
  EXPECT_EQ(Http(port, "GET", "/v2/health/live"), "HTTP/1.1 200 OK|live\n");
  EXPECT_EQ(Http(port, "GET", "/v2/health/ready"), "HTTP/1.1 400 Bad Request|not ready\n");
  ready = true;
  EXPECT_EQ(Http(port, "GET", "/v2/health/ready"), "HTTP/1.1 200 OK|ready\n");
  EXPECT_EQ(Http(port, "HEAD", "/v2/health/ready"), "HTTP/1.1 200 OK|");
  EXPECT_EQ(Http(port, "POST", "/v2/health/ready"), "HTTP/1.1 405 Method Not Allowed|");
  live = false;
  EXPECT_EQ(Http(port, "GET", "/v2/health/live"), "HTTP/1.1 400 Bad Request|not live\n");
  EXPECT_EQ(Http(port, "GET", "/metrics").rfind("HTTP/1.1 200 OK|", 0), 0u);

  live = true;
  (*metrics)->RemoveSources();
  EXPECT_EQ(Http(port, "GET", "/v2/health/live"), "HTTP/1.1 400 Bad Request|not live\n");
}

}  // namespace
}  // namespace dilattn::server
