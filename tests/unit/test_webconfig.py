"""Parsing and validating the exporter-toolkit web config: every error names file and key path.

Loading real certificates is tested in test_web_tls.py, which makes them with openssl.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tcpwatch.config import ConfigError
from tcpwatch.http.tls import GO_CIPHER_SUITES, GO_CURVES, client_sans
from tcpwatch.http.webconfig import (
    RateLimit,
    TlsSettings,
    WebConfig,
    WebConfigError,
    load_web_config,
    parse_web_config,
)
from tcpwatch.validation import parse_duration

HASH = "$2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze"


def parse(text: str) -> WebConfig:
    return parse_web_config(textwrap.dedent(text), "web.yml", "/etc/tcpwatch")


def errors_of(text: str) -> list[str]:
    with pytest.raises(WebConfigError) as caught:
        parse(text)
    return caught.value.errors


def test_full_example() -> None:
    config = parse(
        f"""
        tls_server_config:
          cert_file: tls/server.crt
          key_file: /abs/server.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: clients.crt
          client_allowed_sans: [prometheus.example.net, 10.0.0.5]
          min_version: TLS13
          prefer_server_cipher_suites: false
        http_server_config:
          http2: false
          headers:
            strict-transport-security: max-age=31536000
            X-Frame-Options: deny
            Content-Security-Policy: ""
        basic_auth_users:
          prometheus: {HASH}
        rate_limit:
          interval: 100ms
          burst: 20
        """
    )
    assert config.tls == TlsSettings(
        cert_file="/etc/tcpwatch/tls/server.crt",
        key_file="/abs/server.key",
        client_auth_type="RequireAndVerifyClientCert",
        client_ca_file="/etc/tcpwatch/clients.crt",
        client_allowed_sans=("prometheus.example.net", "10.0.0.5"),
        min_version="TLS13",
        max_version="TLS13",
        prefer_server_cipher_suites=False,
    )
    # Header names take their canonical spelling; a blank value means unset.
    assert dict(config.headers) == {
        "Strict-Transport-Security": "max-age=31536000",
        "X-Frame-Options": "deny",
    }
    assert dict(config.basic_auth_users) == {"prometheus": HASH}
    assert config.rate_limit == RateLimit(0.1, 20)
    assert config.summary() == "TLS (client certificates), basic auth (1 user), rate limited"


@pytest.mark.parametrize("text", ["", "# nothing\n", "{}\n", "tls_server_config:\n"])
def test_empty_means_plain_http_without_auth(text: str) -> None:
    config = parse(text)
    assert config.tls is None
    assert not config.basic_auth_users
    assert config.rate_limit is None
    assert config.summary() == "plain HTTP"


def test_errors_are_collected_one_line_each_with_key_paths() -> None:
    errors = errors_of(
        """
        tls_server_config:
          cert_file: server.crt
          min_version: TLS14
          client_auth_type: Sometimes
        basic_auth_users:
          alice: hunter2
        colour: blue
        """
    )
    assert errors == [
        "web.yml: colour: unknown key (known: basic_auth_users, http_server_config, rate_limit, "
        "tls_server_config)",
        "web.yml: tls_server_config.key_file: missing: TLS needs key_file (or inline key)",
        "web.yml: tls_server_config.client_auth_type: expected one of NoClientCert, "
        "RequestClientCert, RequireAnyClientCert, RequireClientCert, VerifyClientCertIfGiven, "
        'RequireAndVerifyClientCert, got "Sometimes"',
        "web.yml: tls_server_config.min_version: expected one of TLS10, TLS11, TLS12, TLS13, "
        'got "TLS14"',
        "web.yml: basic_auth_users.alice: expected a bcrypt hash ($2a$, $2b$ or $2y$, cost, 53 "
        "characters), got a 7-character string starting 'hunt'; make one with "
        "`htpasswd -nBC 10 \"\" | tr -d ':\\n'`",
    ]
    assert all("\n" not in line for line in errors)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tls_server_config: {cert_file: a, key_file: b, client_ca_file: ca}",
            "web.yml: tls_server_config.client_auth_type: client CAs are configured but "
            "client_auth_type is NoClientCert: set it to RequireAndVerifyClientCert",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_allowed_sans: [x]}",
            "web.yml: tls_server_config.client_allowed_sans: needs a client_auth_type that asks "
            "for a client certificate (RequireAndVerifyClientCert)",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, min_version: TLS13, "
            "max_version: TLS12}",
            "web.yml: tls_server_config.min_version: TLS13 is above max_version TLS12",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, "
            "cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]}",
            'web.yml: tls_server_config.cipher_suites[0]: unknown: "TLS_RSA_WITH_RC4_128_SHA" '
            "(known: " + ", ".join(GO_CIPHER_SUITES) + ")",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, max_version: TLS12, "
            "cipher_suites: [TLS_AES_128_GCM_SHA256]}",
            "web.yml: tls_server_config.cipher_suites: names TLS 1.3 suites only, so TLS 1.3 is "
            "the only version left, but max_version is TLS12",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, curve_preferences: [P256]}",
            'web.yml: tls_server_config.curve_preferences[0]: unknown: "P256" (known: CurveP256, '
            "CurveP384, CurveP521, X25519)",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, curve_preferences: X25519}",
            'web.yml: tls_server_config.curve_preferences: expected a list, got "X25519"',
        ),
        (
            "tls_server_config: {cert: '-----BEGIN', cert_file: a, key_file: b}",
            "web.yml: tls_server_config.cert: give cert or cert_file, not both",
        ),
        (
            "tls_server_config: {cert_file: '', key_file: b}",
            'web.yml: tls_server_config.cert_file: expected a non-empty string, got ""',
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_auth_type: "
            "RequireAndVerifyClientCert, client_ca_file: ca, client_ca: pem}",
            "web.yml: tls_server_config.client_ca: give client_ca or client_ca_file, not both",
        ),
        (
            "tls_server_config: [a, b]",
            "web.yml: tls_server_config: expected a mapping, got ['a', 'b']",
        ),
        (
            "http_server_config: {headers: {Set-Cookie: a}}",
            "web.yml: http_server_config.headers.Set-Cookie: not a header tcpwatch may set "
            "(allowed: Cache-Control, Content-Security-Policy, Strict-Transport-Security, "
            "X-Content-Type-Options, X-Frame-Options, X-XSS-Protection)",
        ),
        (
            "http_server_config: {headers: {X-Frame-Options: allow-from x}}",
            "web.yml: http_server_config.headers.X-Frame-Options: expected one of deny, "
            'sameorigin, got "allow-from x"',
        ),
        (
            "http_server_config: {headers: {X-Content-Type-Options: sniff}}",
            "web.yml: http_server_config.headers.X-Content-Type-Options: expected one of "
            'nosniff, got "sniff"',
        ),
        (
            "http_server_config: {http2: maybe}",
            'web.yml: http_server_config.http2: expected true or false, got "maybe"',
        ),
        (
            'http_server_config: {headers: {X-Frame-Options: "deny\\r\\nX-Evil: 1"}}',
            "web.yml: http_server_config.headers.X-Frame-Options: a header value must be one line",
        ),
        (
            "basic_auth_users: {'a:b': x}",
            "web.yml: basic_auth_users.a:b: a user name must be a non-empty string without ':'",
        ),
        (
            "basic_auth_users: {bob: 12}",
            "web.yml: basic_auth_users.bob: expected a bcrypt hash ($2y$...), got int",
        ),
        (
            "basic_auth_users: {bob: '" + HASH.replace("$10$", "$03$") + "'}",
            "web.yml: basic_auth_users.bob: bcrypt cost 3 is outside 4..31",
        ),
        (
            "basic_auth_users: [bob]",
            "web.yml: basic_auth_users: expected a mapping, got ['bob']",
        ),
        (
            "rate_limit: {interval: fast, burst: 3}",
            'web.yml: rate_limit.interval: expected a duration such as "1s" or "100ms", got "fast"',
        ),
        (
            "rate_limit: {interval: 1s, burst: -1}",
            "web.yml: rate_limit.burst: expected a whole number from 0, got -1",
        ),
        (
            "rate_limit: {interval: 1s}",
            "web.yml: rate_limit.burst: must be at least 1 when an interval is set",
        ),
        ("- just\n- a list\n", "web.yml: (top level): expected a mapping, got ['just', 'a list']"),
        (
            "tls_server_config: {cert_file: a\n",
            "web.yml: line 2: not valid YAML: expected ',' or '}', but got '<stream end>'",
        ),
    ],
)
def test_one_error(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_go_names_map_to_openssl_in_the_given_order() -> None:
    config = parse(
        """
        tls_server_config:
          cert_file: a
          key_file: b
          client_auth_type: RequireClientCert
          cipher_suites: [TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256,
                          TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256]
          curve_preferences: [X25519, CurveP384]
        """
    )
    assert config.tls is not None
    # The old alias selects Go's RequireAnyClientCert, as in exporter-toolkit.
    assert config.tls.client_auth_type == "RequireAnyClientCert"
    # TLS 1.3 suites are not configurable (in Go and OpenSSL alike) and drop out of the list.
    assert config.tls.cipher_suites == (
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    )
    assert not config.tls.only_tls13_suites
    assert config.tls.curve_preferences == ("X25519", "P-384")


def test_every_mapped_cipher_suite_is_known_to_this_openssl() -> None:
    import ssl

    known = {cipher["name"] for cipher in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")
    known |= {cipher["name"] for cipher in context.get_ciphers()}
    mapped = {name for name in GO_CIPHER_SUITES.values() if name is not None}
    assert mapped <= known, sorted(mapped - known)
    assert set(GO_CURVES.values()) == {"P-256", "P-384", "P-521", "X25519"}


def test_client_sans_are_spelt_as_go_spells_them() -> None:
    peer = {
        "subjectAltName": (
            ("DNS", "prometheus.example.net"),
            ("IP Address", "0:0:0:0:0:0:0:1\n"),
            ("IP Address", "10.0.0.5"),
            ("email", "ops@example.net"),
            ("URI", "spiffe://example.net/prometheus"),
        )
    }
    assert client_sans(peer) == (
        "prometheus.example.net",
        "::1",
        "10.0.0.5",
        "ops@example.net",
        "spiffe://example.net/prometheus",
    )
    assert client_sans({}) == ()


def test_the_hash_itself_is_never_echoed() -> None:
    secretish = "$2y$10$" + "x" * 40  # too short to be a hash, long enough to be recognisable
    (line,) = errors_of(f"basic_auth_users: {{bob: '{secretish}'}}")
    assert "x" * 10 not in line


def test_rate_limit_interval_zero_disables_it() -> None:
    assert parse("rate_limit: {interval: '0', burst: 5}").rate_limit is None


def test_web_config_errors_are_config_errors() -> None:
    # The CLI prints ConfigError lines and exits 3: a broken web config must take that path.
    assert issubclass(WebConfigError, ConfigError)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("1s", 1.0),
        ("100ms", 0.1),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10", "1x", "1s2", "-1s", "1 s"])
def test_parse_duration_rejects(text: str) -> None:
    assert parse_duration(text) is None


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "web.yml"
    with pytest.raises(WebConfigError) as caught:
        load_web_config(str(missing))
    assert caught.value.errors == [
        f"{missing}: cannot read the web config file: No such file or directory"
    ]


def test_load_resolves_relative_paths_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  prometheus: {HASH}\n")
    config = load_web_config(str(path))
    assert config.source == str(path)
    assert config.ssl_context is None
    assert dict(config.basic_auth_users) == {"prometheus": HASH}
