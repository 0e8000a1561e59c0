#include "server/grpc/tls.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "kernels/common/small_file.h"

namespace dilattn::server {
namespace {

// The file's text, refused unless it holds `block` (so that a key given for a certificate, say,
// is named as such rather than as a failed handshake later).
absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path,
                                    absl::string_view block, absl::string_view what) {
  absl::StatusOr<std::string> text = ReadSmallFile(flag, path);
  if (!text.ok()) return text.status();
  if (!absl::StrContains(*text, block)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": holds no PEM ", what, " (no \"", block, "\" line)"));
  }
  return text;
}

// gRPC's file watcher only reads the files once the server runs, and a pair it cannot use then
// fails every handshake while the server reports SERVING. A listener with the same files, built
// and dropped here, makes gRPC load them (SSL_CTX: the chain, the key, that the key is the
// chain's, the CAs) and refuse them while the server can still say so and exit.
bool GrpcAcceptsPair(const std::string& cert, const std::string& key,
                     const std::string& client_ca) {
  grpc::SslServerCredentialsOptions options(
      client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                        : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = client_ca;
  options.pem_key_cert_pairs.push_back({key, cert});
  grpc::ServerBuilder builder;
  grpc::CallbackGenericService service;  // a server needs one
  builder.RegisterCallbackGenericService(&service);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(options), &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) return false;
  server->Shutdown();
  return port != 0;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> GrpcServerCredentials(
    const TlsFiles& files, absl::Duration refresh) {
  if (files.cert.empty() && files.key.empty() && files.client_ca.empty()) {
    return grpc::InsecureServerCredentials();
  }
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError(
        files.cert.empty() && files.key.empty()
            ? "--grpc-root-cert needs --grpc-server-cert and --grpc-server-key (mutual TLS is TLS "
              "whose clients show certificates too)"
            : "--grpc-server-cert and --grpc-server-key go together (TLS needs both)");
  }
  absl::StatusOr<std::string> cert =
      ReadPem("--grpc-server-cert", files.cert, "-----BEGIN CERTIFICATE-----", "certificate");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key =
      ReadPem("--grpc-server-key", files.key, "PRIVATE KEY-----", "private key");
  if (!key.ok()) return key.status();
  std::string client_ca;
  if (!files.client_ca.empty()) {
    absl::StatusOr<std::string> ca =
        ReadPem("--grpc-root-cert", files.client_ca, "-----BEGIN CERTIFICATE-----", "certificate");
    if (!ca.ok()) return ca.status();
    client_ca = *std::move(ca);
  }
  if (!GrpcAcceptsPair(*cert, *key, client_ca)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--grpc-server-key ", files.key, " is not the private key of --grpc-server-cert ",
        files.cert, "'s first certificate, or either does not parse",
        client_ca.empty() ? ""
                          : absl::StrCat(", or --grpc-root-cert ", files.client_ca, " does not")));
  }
  const auto seconds =
      static_cast<unsigned int>(std::max<int64_t>(1, absl::ToInt64Seconds(refresh)));
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files.key, files.cert, files.client_ca, seconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (!files.client_ca.empty()) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

}  // namespace dilattn::server
