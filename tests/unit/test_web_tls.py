"""TLS from a web config, over loopback: certificates made with the openssl CLI for each run.

A test CA signs the server certificate (SAN localhost, 127.0.0.1) and two client certificates
(SANs prometheus.example.net and other.example.net), so server auth, client certificates and
client_allowed_sans are all exercised for real.
"""

from __future__ import annotations

import base64
import http.client
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from tcpwatch.config import Config
from tcpwatch.http.app import Health, WebApp
from tcpwatch.http.listen import ListenAddress
from tcpwatch.http.server import WebServer
from tcpwatch.http.webconfig import WebConfigError, load_web_config

StartServer = Callable[[str], WebServer]


@dataclass(frozen=True)
class Pki:
    directory: Path

    def __getitem__(self, name: str) -> str:
        return str(self.directory / name)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _issue(directory: Path, name: str, subject: str, sans: str) -> None:
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(f"subjectAltName={sans}\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    assert shutil.which("openssl"), "the openssl command is needed to make test certificates"
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=tcpwatch test CA",
        cwd=directory,
    )  # fmt: skip
    _issue(directory, "server", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    _issue(directory, "prometheus", "/CN=prometheus", "DNS:prometheus.example.net")
    _issue(directory, "other", "/CN=other", "DNS:other.example.net")
    _openssl(
        "pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out",
        "encrypted.key", cwd=directory,
    )  # fmt: skip
    return Pki(directory)


def write_web_config(pki: Pki, body: str) -> str:
    path = pki.directory / "web.yml"
    path.write_text(body)
    return str(path)


@pytest.fixture
def serve_with(pki: Pki) -> Iterator[StartServer]:
    servers: list[WebServer] = []

    def start(web_yml: str) -> WebServer:
        config = load_web_config(write_web_config(pki, web_yml))
        app = WebApp(lambda: None, Config, Health, config, include_process_metrics=False)
        server = WebServer(ListenAddress("127.0.0.1", 0), app)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def client_context(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca.crt"])
    if cert is not None:
        context.load_cert_chain(pki[f"{cert}.crt"], pki[f"{cert}.key"])
    return context


def https_get(
    server: WebServer, context: ssl.SSLContext, path: str = "/-/healthy", **headers: str
) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection(
        "localhost", server.address.port, context=context, timeout=5
    )
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_tls_serves_and_plain_http_is_refused(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    assert server.url.startswith("https://127.0.0.1:")
    assert https_get(server, client_context(pki)) == (200, b"Healthy\n")
    # A plain HTTP client gets a 400 that says why (as Go's servers answer), not a reset.
    plain = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
    plain.request("GET", "/-/healthy")
    response = plain.getresponse()
    assert response.status == 400
    assert response.read() == b"Client sent an HTTP request to an HTTPS server.\n"
    plain.close()
    assert https_get(server, client_context(pki))[0] == 200


def test_min_version_is_enforced(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  min_version: TLS13\n"
    )
    old_client = client_context(pki)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        https_get(server, old_client)
    assert https_get(server, client_context(pki))[0] == 200


def test_client_certificates_required_and_verified(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
    )
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(server, client_context(pki))  # no client certificate


def test_client_allowed_sans(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        "  client_allowed_sans: [prometheus.example.net]\n"
    )
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200
    # Verified by the CA, but not a SAN on the list: the connection is closed unanswered.
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(server, client_context(pki, "other"))


def test_basic_auth_over_tls(pki: Pki, serve_with: StartServer) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    assert https_get(server, client_context(pki))[0] == 401
    token = base64.b64encode(b"prometheus:s3cret").decode()
    assert https_get(server, client_context(pki), Authorization=f"Basic {token}")[0] == 200


def test_a_slow_handshake_does_not_block_other_clients(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    with socket.create_connection(("127.0.0.1", server.address.port), timeout=5):
        # connected, never says hello: its handshake waits in its own thread
        assert https_get(server, client_context(pki))[0] == 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot read {dir}/missing.crt: No such "
            "file or directory",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: prometheus.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot load the certificate "
            "{dir}/server.crt with the key {dir}/prometheus.key: key values mismatch",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: encrypted.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot load the certificate "
            "{dir}/server.crt with the key {dir}/encrypted.key: the key file is encrypted; "
            "tcpwatch needs an unencrypted key",
        ),
        (
            "tls_server_config:\n  cert_file: server.ext\n  key_file: server.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot load the certificate "
            "{dir}/server.ext with the key {dir}/server.key: not a valid PEM file",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: server.ext\n",
            "{dir}/web.yml: tls_server_config.client_ca_file: cannot load client CA "
            "certificates: no certificate or crl found",
        ),
    ],
)
def test_certificate_problems_are_reported_at_load(pki: Pki, body: str, expected: str) -> None:
    with pytest.raises(WebConfigError) as caught:
        load_web_config(write_web_config(pki, body))
    assert caught.value.errors == [expected.format(dir=pki.directory)]


def test_inline_client_ca(pki: Pki, serve_with: StartServer) -> None:
    ca = Path(pki["ca.crt"]).read_text()
    indented = "\n".join("    " + line for line in ca.splitlines())
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca: |\n{indented}\n"
    )
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200
