"""Test certificates made with the openssl CLI for each run (never checked in).

A test CA signs the server certificate (SAN localhost, 127.0.0.1) and two client certificates
(SANs prometheus.example.net and other.example.net); `stranger` is a self-signed client
certificate no CA knows (SAN prometheus.example.net); `encrypted.key` is the server key under a
passphrase. All keys are P-256 ECDSA.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    directory: Path

    def __getitem__(self, name: str) -> str:
        return str(self.directory / name)


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _issue(directory: Path, name: str, subject: str, sans: str) -> None:
    openssl("req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
            cwd=directory)  # fmt: skip
    (directory / f"{name}.ext").write_text(f"subjectAltName={sans}\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


def make_pki(directory: Path) -> Pki:
    assert shutil.which("openssl"), "the openssl command is needed to make test certificates"
    openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=tcpwatch test CA", cwd=directory)  # fmt: skip
    _issue(directory, "server", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    _issue(directory, "prometheus", "/CN=prometheus", "DNS:prometheus.example.net")
    _issue(directory, "other", "/CN=other", "DNS:other.example.net")
    openssl("req", "-x509", *_EC, "-keyout", "stranger.key", "-out", "stranger.crt", "-days",
            "2", "-subj", "/CN=stranger", "-addext", "subjectAltName=DNS:prometheus.example.net",
            cwd=directory)  # fmt: skip
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out",
            "encrypted.key", cwd=directory)  # fmt: skip
    return Pki(directory)
