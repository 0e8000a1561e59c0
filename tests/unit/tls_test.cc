// What GrpcServerCredentials refuses before any file is handed to gRPC; the TLS handshakes
// themselves, with real certificates, are tests/e2e/test_tls.py's.

#include "server/grpc/tls.h"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace dilattn::server {
namespace {

class TlsFilesTest : public ::testing::Test {
 protected:
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = ::testing::TempDir() + "/tls_test_" + name;
    std::ofstream(path) << text;
    written_.push_back(path);
    return path;
  }
  void TearDown() override {
    for (const std::string& path : written_) std::remove(path.c_str());
  }
  static absl::Status Refusal(const TlsFiles& files) {
    return GrpcServerCredentials(files, absl::Seconds(10)).status();
  }

 private:
  std::vector<std::string> written_;
};

TEST_F(TlsFilesTest, NoFilesIsPlaintext) {
  EXPECT_TRUE(GrpcServerCredentials({}, absl::Seconds(10)).ok());
}

TEST_F(TlsFilesTest, EachRefusalNamesTheFlagAndTheFile) {
  const std::string cert = Write("cert.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
  const std::string key = Write("key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n");
  const std::string missing = ::testing::TempDir() + "/tls_test_missing.pem";
  struct Case {
    TlsFiles files;
    std::string needle;
  };
  for (const Case& c : std::vector<Case>{
           {{cert, "", ""}, "--grpc-server-cert and --grpc-server-key go together"},
           {{"", key, ""}, "--grpc-server-cert and --grpc-server-key go together"},
           {{"", "", cert}, "--grpc-root-cert needs --grpc-server-cert and --grpc-server-key"},
           {{missing, key, ""}, "--grpc-server-cert " + missing + ": cannot be read"},
           {{key, key, ""}, "--grpc-server-cert " + key + ": holds no PEM certificate"},
           {{cert, cert, ""}, "--grpc-server-key " + cert + ": holds no PEM private key"},
           {{cert, key, key}, "--grpc-root-cert " + key + ": holds no PEM certificate"},
           {{"/dev/zero", key, ""}, "--grpc-server-cert /dev/zero: larger than 1 MiB"},
           // PEM markers around what is no certificate: gRPC's own loading refuses it.
           {{cert, key, ""}, "--grpc-server-key " + key + " is not the private key of"},
       }) {
    const absl::Status s = Refusal(c.files);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), c.needle)) << s << "\nwanted: " << c.needle;
  }
}

}  // namespace
}  // namespace dilattn::server
