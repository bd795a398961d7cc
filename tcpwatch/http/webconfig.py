"""The web config file (`--web-config`, config key `web_config`): TLS and basic auth.

It is the format of Prometheus' exporter-toolkit (`--web.config.file` of node_exporter and
Prometheus itself), so one file serves a whole fleet's exporters. Example::

    tls_server_config:
      cert_file: tcpwatch.crt            # relative paths: from this file's directory
      key_file: tcpwatch.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: clients-ca.crt
      client_allowed_sans: [prometheus.example.net]
      min_version: TLS12
    http_server_config:
      headers:
        Strict-Transport-Security: max-age=31536000
    basic_auth_users:
      prometheus: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze
    rate_limit:
      interval: 100ms
      burst: 20

Settings the toolkit has and tcpwatch cannot honour with Python's ssl module (inline `cert` and
`key`, `cipher_suites`, `curve_preferences`, the client auth types that accept unverified
certificates) are rejected with an error rather than ignored: a security setting must never be
dropped silently. `http_server_config.http2` is accepted and has no effect (HTTP/1.1 only).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tcpwatch.validation import (
    ConfigError,
    Validator,
    check_regular_file,
    load_yaml,
    parse_duration,
    read_config_file,
    show,
    shown_path,
)

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit's client_auth_type values tcpwatch supports -> Python's verify mode.
CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's modes that ask for a certificate without verifying it: Python's ssl verifies every
# certificate it requests, so these cannot be offered.
UNVERIFIED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert")
# The response headers exporter-toolkit lets a web config set, in their canonical spelling.
ALLOWED_HEADERS: tuple[str, ...] = (
    "Cache-Control",
    "Content-Security-Policy",
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
)
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# RFC 9110 field names: a token. Values: visible Latin-1 characters, spaces and tabs (obs-text
# included, as http.server sends Latin-1), never CR, LF or other control characters.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
MAX_HEADER_VALUE_CHARS = 4096


class WebConfigError(ConfigError):
    """One or more web config errors, each a line naming the file and the key path."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """`tls_server_config`, file paths already made absolute."""

    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_ca: str | None = None  # inline PEM, instead of client_ca_file
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket over all requests: `burst` at once, then one per `interval_seconds`."""

    interval_seconds: float
    burst: int


@dataclass(frozen=True, slots=True)
class WebConfig:
    source: str = "<none>"
    tls: TlsSettings | None = None
    basic_auth_users: Mapping[str, str] = field(default_factory=dict)  # user -> bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)
    rate_limit: RateLimit | None = None
    # Built by load_web_config() from `tls`; never mutated after that.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def summary(self) -> str:
        """One line for logs and the landing page, e.g. ``TLS (client certificates), basic auth
        (2 users)``."""
        parts = []
        if self.tls is None:
            parts.append("plain HTTP")
        elif self.tls.client_auth_type == "NoClientCert":
            parts.append("TLS")
        else:
            parts.append("TLS (client certificates)")
        if self.basic_auth_users:
            count = len(self.basic_auth_users)
            parts.append(f"basic auth ({count} user{'s' if count != 1 else ''})")
        if self.rate_limit is not None:
            parts.append("rate limited")
        return ", ".join(parts)


def parse_web_config(text: str, source: str, base_dir: str = ".") -> WebConfig:
    """Validate the YAML text of a web config; relative file names are taken from ``base_dir``.

    Collects every problem and raises :class:`WebConfigError` with one line per problem, each
    naming the key path (``web.yml: tls_server_config.min_version: expected one of ...``).
    Files are not opened here: :func:`load_web_config` does that.
    """
    try:
        raw = load_yaml(text, source)
    except ConfigError as error:
        raise WebConfigError(error.errors) from None
    check = Validator(source)
    top = check.mapping(raw, "(top level)")
    if top is None:
        raise WebConfigError(check.errors)
    check.unknown_keys(
        top, ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"), ""
    )
    tls = _tls(check, top.get("tls_server_config"), base_dir)
    headers = _http(check, top.get("http_server_config"))
    users = _users(check, top.get("basic_auth_users"))
    rate_limit = _rate_limit(check, top.get("rate_limit"))
    if check.errors:
        raise WebConfigError(check.errors)
    return WebConfig(source, tls, users, headers, rate_limit)


def _tls(check: Validator, raw: object, base_dir: str) -> TlsSettings | None:
    section = check.mapping(raw, "tls_server_config")
    if not section:
        return None
    path = "tls_server_config"
    unsupported = {
        "cert": "inline certificates are not supported: put it in a file and use cert_file",
        "key": "inline keys are not supported: put it in a file and use key_file",
        "cipher_suites": "not supported by tcpwatch (Go cipher names); remove it to use "
        "OpenSSL's defaults",
        "curve_preferences": "not supported by tcpwatch; remove it to use OpenSSL's defaults",
    }
    known = (
        "cert_file",
        "key_file",
        "client_auth_type",
        "client_ca_file",
        "client_ca",
        "client_allowed_sans",
        "min_version",
        "max_version",
        "prefer_server_cipher_suites",
    )
    for key, reason in unsupported.items():
        if key in section:
            check.error(f"{path}.{key}", reason)
    check.unknown_keys(section, (*known, *unsupported), path)

    def file(key: str) -> str | None:
        if key not in section:
            return None
        name = check.file_path(section[key], f"{path}.{key}")
        return None if name is None else os.path.join(base_dir, name)

    cert_file, key_file = file("cert_file"), file("key_file")
    if "cert" not in section and "key" not in section:  # inline ones are reported above
        for key in ("cert_file", "key_file"):
            if key not in section:
                check.error(f"{path}.{key}", "missing: TLS needs both cert_file and key_file")
    client_ca_file = file("client_ca_file")
    client_ca = (
        check.string(section["client_ca"], f"{path}.client_ca")
        if ("client_ca" in section)
        else None
    )
    if client_ca_file is not None and client_ca is not None:
        check.error(f"{path}.client_ca", "give client_ca or client_ca_file, not both")
    auth: str | None = "NoClientCert"
    if "client_auth_type" in section:
        value = section["client_auth_type"]
        auth = None
        if value in UNVERIFIED_CLIENT_AUTH_TYPES:
            check.error(
                f"{path}.client_auth_type",
                f'"{value}" accepts unverified certificates and is not supported: use '
                "RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file",
            )
        else:
            auth = check.choice(value, f"{path}.client_auth_type", tuple(CLIENT_AUTH_TYPES))
    has_ca = client_ca_file is not None or client_ca is not None
    # With an invalid client_auth_type (reported above) its consistency with the CA is moot.
    if auth is not None and auth != "NoClientCert" and not has_ca:
        check.error(f"{path}.client_ca_file", f"missing: client_auth_type {auth} needs it")
    if auth == "NoClientCert" and has_ca:
        check.error(
            f"{path}.client_auth_type",
            "client CAs are configured but client_auth_type is NoClientCert: set it to "
            "RequireAndVerifyClientCert",
        )
    sans: tuple[str, ...] = ()
    if "client_allowed_sans" in section:
        raw_sans = section["client_allowed_sans"]
        if not isinstance(raw_sans, list):
            check.error(f"{path}.client_allowed_sans", f"expected a list, got {show(raw_sans)}")
        else:
            parsed = [
                check.string(item, f"{path}.client_allowed_sans[{index}]")
                for index, item in enumerate(raw_sans)
            ]
            sans = tuple(item for item in parsed if item is not None)
            if auth not in (None, "RequireAndVerifyClientCert"):
                check.error(
                    f"{path}.client_allowed_sans",
                    "needs client_auth_type RequireAndVerifyClientCert (otherwise a client "
                    "without a certificate has no SAN to check)",
                )
    versions = {"min_version": "TLS12", "max_version": "TLS13"}
    for key in versions:
        if key in section:
            chosen = check.choice(section[key], f"{path}.{key}", tuple(TLS_VERSIONS))
            versions[key] = chosen or versions[key]
    if TLS_VERSIONS[versions["min_version"]] > TLS_VERSIONS[versions["max_version"]]:
        check.error(
            f"{path}.min_version",
            f"{versions['min_version']} is above max_version {versions['max_version']}",
        )
    prefer = True
    if "prefer_server_cipher_suites" in section:
        flag = check.boolean(
            section["prefer_server_cipher_suites"], f"{path}.prefer_server_cipher_suites"
        )
        prefer = prefer if flag is None else flag
    if cert_file is None or key_file is None or auth is None:
        return None
    return TlsSettings(
        cert_file=cert_file,
        key_file=key_file,
        client_auth_type=auth,
        client_ca_file=client_ca_file,
        client_ca=client_ca,
        client_allowed_sans=sans,
        min_version=versions["min_version"],
        max_version=versions["max_version"],
        prefer_server_cipher_suites=prefer,
    )


def _http(check: Validator, raw: object) -> dict[str, str]:
    section = check.mapping(raw, "http_server_config")
    if not section:
        return {}
    check.unknown_keys(section, ("http2", "headers"), "http_server_config")
    if "http2" in section:
        check.boolean(section["http2"], "http_server_config.http2")
    headers = check.mapping(section.get("headers"), "http_server_config.headers")
    chosen: dict[str, str] = {}
    canonical = {name.lower(): name for name in ALLOWED_HEADERS}
    for name, value in (headers or {}).items():
        path = f"http_server_config.headers.{name}"
        header = canonical.get(str(name).lower())
        if header is None:
            check.error(
                path, f"not a header tcpwatch may set (allowed: {', '.join(ALLOWED_HEADERS)})"
            )
            continue
        if value is None or value == "":
            continue  # blank means unset, as in exporter-toolkit
        text = check.string(value, path)
        if text is None:
            continue
        problem = header_problem(header, text)
        if problem is not None:
            check.error(path, problem)
        else:
            chosen[header] = text
    return chosen


def header_problem(name: str, value: str) -> str | None:
    """Why the HTTP layer could not send ``name: value`` as it is, or None if it can.

    Checked at load so that a value http.server cannot encode never blanks every response.
    """
    if not _HEADER_NAME.fullmatch(name):
        return "a header name must be a token (letters, digits and !#$%&'*+-.^_`|~)"
    if "\r" in value or "\n" in value:
        return "a header value must be one line"
    if len(value) > MAX_HEADER_VALUE_CHARS:
        return f"a header value is at most {MAX_HEADER_VALUE_CHARS} characters, got {len(value)}"
    if not _HEADER_VALUE.fullmatch(value):
        bad = next(c for c in value if not _HEADER_VALUE.fullmatch(c))
        return (
            f"a header value must be Latin-1 text without control characters, got {show(value)} "
            f"(character U+{ord(bad):04X})"
        )
    return None


def _users(check: Validator, raw: object) -> dict[str, str]:
    section = check.mapping(raw, "basic_auth_users")
    users: dict[str, str] = {}
    for user, hashed in (section or {}).items():
        path = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            check.error(path, "a user name must be a non-empty string without ':'")
            continue
        # The hash is not echoed: it is a secret's digest and belongs in no log.
        if not isinstance(hashed, str):
            check.error(path, f"expected a bcrypt hash ($2y$...), got {type(hashed).__name__}")
            continue
        match = _BCRYPT_HASH.match(hashed)
        if match is None:
            check.error(
                path,
                f"expected a bcrypt hash ($2a$, $2b$ or $2y$, cost, 53 characters), got a "
                f"{len(hashed)}-character string starting {hashed[:4]!r}; make one with "
                "`htpasswd -nBC 10 \"\" | tr -d ':\\n'`",
            )
            continue
        if not 4 <= int(match.group(1)) <= 31:
            check.error(path, f"bcrypt cost {int(match.group(1))} is outside 4..31")
            continue
        users[user] = hashed
    return users


def _rate_limit(check: Validator, raw: object) -> RateLimit | None:
    section = check.mapping(raw, "rate_limit")
    if not section:
        return None
    check.unknown_keys(section, ("interval", "burst"), "rate_limit")
    interval: float | None = 0.0
    if "interval" in section:
        value = section["interval"]
        interval = parse_duration(value) if isinstance(value, str) else None
        if interval is None:
            check.error(
                "rate_limit.interval",
                f'expected a duration such as "1s" or "100ms", got {show(value)}',
            )
    burst = section.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or not 0 <= burst <= 1_000_000:
        check.error("rate_limit.burst", f"expected a whole number from 0, got {show(burst)}")
        return None
    if not interval:  # 0 (or a broken value, reported above) disables the limiter
        return None
    if burst == 0:
        check.error("rate_limit.burst", "must be at least 1 when an interval is set")
        return None
    return RateLimit(interval, burst)


def build_ssl_context(tls: TlsSettings, source: str) -> ssl.SSLContext:
    """A server SSLContext for ``tls``; WebConfigError names the key whose file failed."""
    source = shown_path(source)
    path = "tls_server_config"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = TLS_VERSIONS[tls.min_version]
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    except (ValueError, ssl.SSLError) as error:
        raise WebConfigError([f"{source}: {path}.min_version: {_ssl_reason(error)}"]) from None
    errors: list[str] = []
    files = {"cert_file": tls.cert_file, "key_file": tls.key_file}
    if tls.client_ca_file is not None and tls.client_auth_type != "NoClientCert":
        files["client_ca_file"] = tls.client_ca_file
    unreadable: set[str] = set()
    for key, name in files.items():
        # Checked without blocking before OpenSSL opens them: a FIFO would hang it (and a reload).
        reason = check_regular_file(name)
        if reason is not None:
            unreadable.add(key)
            errors.append(f"{source}: {path}.{key}: cannot read {shown_path(name)}: {reason}")
    if not unreadable & {"cert_file", "key_file"}:
        try:
            # Never OpenSSL's passphrase prompt: a daemon would hang reading its terminal.
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_passphrase)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError too
            errors.append(
                f"{source}: {path}.cert_file: cannot load the certificate "
                f"{shown_path(tls.cert_file)} with the key {shown_path(tls.key_file)}: "
                f"{_ssl_reason(error)}"
            )
    if tls.client_auth_type != "NoClientCert" and "client_ca_file" not in unreadable:
        context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
        try:
            if tls.client_ca is not None:
                context.load_verify_locations(cadata=tls.client_ca)
            else:
                context.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ValueError) as error:
            key = "client_ca" if tls.client_ca is not None else "client_ca_file"
            errors.append(
                f"{source}: {path}.{key}: cannot load client CA certificates: {_ssl_reason(error)}"
            )
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if errors:
        raise WebConfigError(errors)
    return context


def _refuse_passphrase() -> bytes:
    raise ValueError("the key file is encrypted; tcpwatch needs an unencrypted key")


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError):
        # "[SSL] PEM lib (_ssl.c:3900)" -> "PEM lib": the C source position helps nobody.
        text = str(error.reason or (error.args[1] if len(error.args) > 1 else error))
        text = re.sub(r"^\[[A-Z0-9_]+\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)
        if text in ("PEM lib", "PEM_LIB"):
            return "not a valid PEM file"
        return text.replace("_", " ").lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_web_config(path: str) -> WebConfig:
    """Read, validate and prepare a web config file (certificates loaded, so errors show now)."""
    try:
        text = read_config_file(path, "web config file")
    except ConfigError as error:
        raise WebConfigError(error.errors) from None
    config = parse_web_config(text, path, os.path.dirname(os.path.abspath(path)))
    if config.tls is None:
        return config
    return replace(config, ssl_context=build_ssl_context(config.tls, path))


def client_sans(peer: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The subjectAltName values of a verified peer certificate (``SSLSocket.getpeercert()``).

    Example input: ``{"subjectAltName": (("DNS", "prometheus.example.net"), ("IP Address",
    "10.0.0.5"))}`` -> ``("prometheus.example.net", "10.0.0.5")``.
    """
    if not peer:
        return ()
    return tuple(str(value) for _, value in peer.get("subjectAltName", ()))
