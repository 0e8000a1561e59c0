"""Certificates for TLS tests and benchmarks: a CA and what it signs, made by openssl's
command-line tool as PEM files, fresh for each run."""

import subprocess


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class Pki:
    """A CA and certificates it signs, as PEM files in `root`."""

    def __init__(self, root, name):
        self.root = root
        self.name = name
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem", "-days", "2",
                 "-subj", f"/CN={name} test CA", cwd=root)
        self.ca = root / f"{name}-ca.pem"

    def issue(self, who, san=None):
        """(certificate, key) for `who`, signed by this CA; `san` as openssl's subjectAltName."""
        stem = f"{self.name}-{who}"
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={who}",
                 cwd=self.root)
        ext = self.root / f"{stem}.ext"
        ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{self.name}-ca.pem", "-CAkey",
                 f"{self.name}-ca.key", "-CAcreateserial", "-out", f"{stem}.pem", "-days", "2",
                 "-extfile", ext.name, cwd=self.root)
        return self.root / f"{stem}.pem", self.root / f"{stem}.key"

    def server(self):
        return self.issue("server", san="DNS:localhost,IP:127.0.0.1")
