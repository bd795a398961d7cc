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

Every key of the toolkit's format is honoured; `tcpwatch/http/tls.py` maps the TLS ones (Go's
cipher suite and curve names) onto OpenSSL. `http_server_config.http2` is accepted and has no
effect (tcpwatch speaks HTTP/1.1; HTTP/2 is an option of Go's server, not part of the access
policy). docs/configuration.md lists what differs.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tcpwatch.http.tls import (
    TlsSettings,
    WebConfigError,
    build_ssl_context,
    client_sans,
    parse_tls,
)
from tcpwatch.validation import (
    MAX_FILE_BYTES,
    ConfigError,
    Validator,
    parse_duration,
    read_config_file,
    show,
)

# Re-exported: the server and the tests take these from here.
__all__ = [
    "ALLOWED_HEADERS",
    "RateLimit",
    "TlsSettings",
    "WebConfig",
    "WebConfigError",
    "build_ssl_context",
    "client_sans",
    "load_web_config",
    "parse_duration",
    "parse_web_config",
]

# The response headers exporter-toolkit lets a web config set, in their canonical spelling.
ALLOWED_HEADERS: tuple[str, ...] = (
    "Cache-Control",
    "Content-Security-Policy",
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
)
# Headers whose values exporter-toolkit limits to a list (exact, as there).
HEADER_VALUES: Mapping[str, tuple[str, ...]] = {
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
}
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# RFC 9110 field names: a token. Values: visible Latin-1 characters, spaces and tabs (obs-text
# included, as http.server sends Latin-1), never CR, LF or other control characters.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
MAX_HEADER_VALUE_CHARS = 4096


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
    # A digest of client_ca_file's content as loaded: a reload that changes the CAs behind an
    # unchanged path changes which client certificates are let in.
    client_ca_digest: str = ""

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
        from tcpwatch.yamlload import load_yaml  # PyYAML only when a file is read

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
    tls = parse_tls(check, top.get("tls_server_config"), base_dir)
    headers = _http(check, top.get("http_server_config"))
    users = _users(check, top.get("basic_auth_users"))
    rate_limit = _rate_limit(check, top.get("rate_limit"))
    if check.errors:
        raise WebConfigError(check.errors)
    return WebConfig(source, tls, users, headers, rate_limit)


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
        elif text not in HEADER_VALUES.get(header, (text,)):
            check.choice(text, path, HEADER_VALUES[header])
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


def load_web_config(path: str) -> WebConfig:
    """Read, validate and prepare a web config file (certificates loaded, so errors show now)."""
    try:
        text = read_config_file(path, "web config file")
    except ConfigError as error:
        raise WebConfigError(error.errors) from None
    config = parse_web_config(text, path, os.path.dirname(os.path.abspath(path)))
    if config.tls is None:
        return config
    context = build_ssl_context(config.tls, path)
    return replace(config, ssl_context=context, client_ca_digest=_digest(config.tls.client_ca_file))


def _digest(path: str | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as file:  # a regular file: build_ssl_context just checked it
            return hashlib.sha256(file.read(MAX_FILE_BYTES + 1)).hexdigest()
    except OSError as error:
        return f"unreadable: {error.strerror}"
