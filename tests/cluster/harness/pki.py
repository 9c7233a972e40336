"""A throwaway certificate authority for one cluster, made with the openssl command line.

The API server authenticates every client by certificate (RBAC then applies to the certificate's
subject), serves TLS with a certificate for the loopback address, and signs service-account tokens
with its own key pair.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "3650"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key as files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every credential a cluster needs, under one folder."""

    folder: Path

    @property
    def ca(self) -> Pair:
        return Pair(self.folder / "ca.crt", self.folder / "ca.key")

    @property
    def sa_key(self) -> Path:
        return self.folder / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.folder / "sa.pub"

    def pair(self, name: str) -> Pair:
        return Pair(self.folder / f"{name}.crt", self.folder / f"{name}.key")

    def create(self) -> Pki:
        """Write the CA, serving and client certificates, and the service-account keys (idempotent)."""
        d = self.folder
        d.mkdir(parents=True, exist_ok=True)
        if not self.ca.cert.is_file():
            _openssl("genrsa", "-out", "ca.key", "2048", cwd=d)
            _openssl(
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-days",
                DAYS,
                "-subj",
                "/CN=fedtune-test-ca",
                "-out",
                "ca.crt",
                cwd=d,
            )
        if not self.sa_key.is_file():
            _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
            _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        sans = "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default"
        sans += ",DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        self._issue("apiserver", "/CN=kube-apiserver", server_sans=sans)
        self._issue("agent-serving", "/CN=fedtune-node-agent", server_sans="IP:127.0.0.1,DNS:localhost")
        self._issue("admin", "/O=system:masters/CN=fedtune-admin")
        self._issue("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
        self._issue("controller-manager", "/CN=system:kube-controller-manager")
        self._issue("scheduler", "/CN=system:kube-scheduler")
        self._issue("node-agent", "/O=system:masters/CN=fedtune-node-agent")
        return self

    def _issue(self, name: str, subject: str, server_sans: str | None = None) -> None:
        pair = self.pair(name)
        if pair.cert.is_file():
            return
        d = self.folder
        ext = d / f"{name}.ext"
        usage = "serverAuth" if server_sans else "clientAuth"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
        lines.append(f"extendedKeyUsage={usage}")
        if server_sans:
            lines.append(f"subjectAltName={server_sans}")
        ext.write_text("\n".join(lines) + "\n")
        _openssl("genrsa", "-out", pair.key.name, "2048", cwd=d)
        _openssl("req", "-new", "-key", pair.key.name, "-subj", subject, "-out", f"{name}.csr", cwd=d)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            DAYS,
            "-extfile",
            ext.name,
            "-out",
            pair.cert.name,
            cwd=d,
        )
