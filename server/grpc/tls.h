#ifndef DILATTN_SERVER_GRPC_TLS_H_
#define DILATTN_SERVER_GRPC_TLS_H_

// gRPC over TLS, and mutual TLS: the credentials the gRPC port listens with.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/security/server_credentials.h"

namespace dilattn::server {

// PEM files, by the flags that name them (Triton's names).
struct TlsFiles {
  std::string cert;       // --grpc-server-cert: the server's certificate chain; empty: plaintext
  std::string key;        // --grpc-server-key: its private key
  std::string client_ca;  // --grpc-root-cert: clients must present a certificate these CAs signed
};

// Plaintext when `files.cert` is empty. Otherwise TLS whose files are read again every `refresh`,
// so that a rotated certificate (a Kubernetes Secret that cert-manager renews, say) takes effect
// on new connections without a restart. gRPC does not keep the last good pair: after a rotation
// to files it cannot load, new handshakes fail (it logs why) until the files are good again.
// INVALID_ARGUMENT, naming the flag and the file, when a file cannot be read, holds no PEM block
// of its kind, or the key is not the certificate's.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> GrpcServerCredentials(
    const TlsFiles& files, absl::Duration refresh);

}  // namespace dilattn::server

#endif  // DILATTN_SERVER_GRPC_TLS_H_
