"""`tls_server_config` of a web config: validation and the server SSLContext.

The keys are exporter-toolkit's (Go's crypto/tls names); this module maps them onto OpenSSL
through Python's ssl module, so one file gives node_exporter and tcpwatch the same TLS:

- `cipher_suites`: Go's names (those `tls.CipherSuites()` lists) -> OpenSSL's; the TLS 1.3
  suites are accepted and, as in Go, not configurable.
- `curve_preferences`: CurveP256/P384/P521, X25519 -> OpenSSL's groups, in the given order.
- `client_auth_type`: all of Go's values. The two that take a certificate without verifying it
  (`RequestClientCert`, `RequireAnyClientCert`) and a list of several curves need two OpenSSL
  calls Python's ssl does not offer (`SSL_CTX_set_verify` with a callback, a groups list); they
  are made through ctypes on the context's own `SSL_CTX`, after a check that the pointer really
  is that context (see :func:`_ssl_ctx`); where the check fails the key is refused, never
  dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tcpwatch.validation import ConfigError, Validator, check_regular_file, show, shown_path

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's ClientAuthType names (and the toolkit's old alias) -> the Go type they select.
CLIENT_AUTH_TYPES: Mapping[str, str] = {
    "NoClientCert": "NoClientCert",
    "RequestClientCert": "RequestClientCert",
    "RequireAnyClientCert": "RequireAnyClientCert",
    "RequireClientCert": "RequireAnyClientCert",
    "VerifyClientCertIfGiven": "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert": "RequireAndVerifyClientCert",
}
# Go's secure cipher suites (crypto/tls.CipherSuites) -> OpenSSL's name; None: a TLS 1.3 suite,
# always enabled and not configurable, in Go and in OpenSSL's cipher list alike.
GO_CIPHER_SUITES: Mapping[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
# Go's CurveID names the toolkit accepts -> OpenSSL's group names.
GO_CURVES: Mapping[str, str] = {
    "CurveP256": "P-256",
    "CurveP384": "P-384",
    "CurveP521": "P-521",
    "X25519": "X25519",
}
_SSL_VERIFY_PEER = 0x01
_SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
_SSL_CTRL_SET_GROUPS_LIST = 92
_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_PATH = "tls_server_config"


class WebConfigError(ConfigError):
    """One or more web config errors, each a line naming the file and the key path."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """`tls_server_config`, file paths already made absolute, Go names mapped to OpenSSL's."""

    cert_file: str | None
    key_file: str | None
    client_auth_type: str = "NoClientCert"  # the Go type (aliases resolved)
    client_ca_file: str | None = None
    client_ca: str | None = None  # inline PEM, instead of client_ca_file
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True
    cipher_suites: tuple[str, ...] = ()  # OpenSSL names, TLS <= 1.2 only; () = defaults
    only_tls13_suites: bool = False  # cipher_suites named TLS 1.3 suites only
    curve_preferences: tuple[str, ...] = ()  # OpenSSL group names; () = defaults
    cert: str | None = None  # inline PEM, instead of cert_file
    key: str | None = None  # inline PEM, instead of key_file


def parse_tls(check: Validator, raw: object, base_dir: str) -> TlsSettings | None:
    """Validate `tls_server_config` (errors go to ``check``); None if absent or invalid."""
    section = check.mapping(raw, _PATH)
    if not section:
        return None
    known = (
        "cert", "key", "cert_file", "key_file", "client_auth_type", "client_ca_file",
        "client_ca", "client_allowed_sans", "min_version", "max_version",
        "prefer_server_cipher_suites", "cipher_suites", "curve_preferences",
    )  # fmt: skip
    check.unknown_keys(section, known, _PATH)

    def text(key: str) -> str | None:
        return check.string(section[key], f"{_PATH}.{key}") if key in section else None

    def file(key: str) -> str | None:
        name = check.file_path(section[key], f"{_PATH}.{key}") if key in section else None
        return None if name is None else os.path.join(base_dir, name)

    cert_file, key_file, client_ca_file = (
        file("cert_file"),
        file("key_file"),
        file("client_ca_file"),
    )
    cert, key, client_ca = text("cert"), text("key"), text("client_ca")
    for inline, named in (
        ("cert", "cert_file"),
        ("key", "key_file"),
        ("client_ca", "client_ca_file"),
    ):
        if inline in section and named in section:
            check.error(f"{_PATH}.{inline}", f"give {inline} or {named}, not both")
        elif inline not in section and named not in section and inline != "client_ca":
            check.error(f"{_PATH}.{named}", f"missing: TLS needs {named} (or inline {inline})")
    auth: str | None = "NoClientCert"
    if "client_auth_type" in section:
        auth = check.choice(
            section["client_auth_type"], f"{_PATH}.client_auth_type", tuple(CLIENT_AUTH_TYPES)
        )
        auth = None if auth is None else CLIENT_AUTH_TYPES[auth]
    if auth == "NoClientCert" and (client_ca_file is not None or client_ca is not None):
        check.error(
            f"{_PATH}.client_auth_type",
            "client CAs are configured but client_auth_type is NoClientCert: set it to "
            "RequireAndVerifyClientCert",
        )
    sans = _string_list(check, section, "client_allowed_sans")
    if sans and auth == "NoClientCert":
        check.error(
            f"{_PATH}.client_allowed_sans",
            "needs a client_auth_type that asks for a "
            "client certificate (RequireAndVerifyClientCert)",
        )
    versions = {"min_version": "TLS12", "max_version": "TLS13"}
    for name in versions:
        if name in section:
            versions[name] = (
                check.choice(section[name], f"{_PATH}.{name}", tuple(TLS_VERSIONS))
                or versions[name]
            )
    if TLS_VERSIONS[versions["min_version"]] > TLS_VERSIONS[versions["max_version"]]:
        check.error(
            f"{_PATH}.min_version",
            f"{versions['min_version']} is above max_version {versions['max_version']}",
        )
    prefer = True
    if "prefer_server_cipher_suites" in section:
        flag = check.boolean(
            section["prefer_server_cipher_suites"], f"{_PATH}.prefer_server_cipher_suites"
        )
        prefer = prefer if flag is None else flag
    suites = _mapped(check, section, "cipher_suites", GO_CIPHER_SUITES)
    tls12_suites = tuple(name for name in suites if name is not None)
    only_tls13 = bool(suites) and not tls12_suites
    if only_tls13 and versions["max_version"] != "TLS13":
        check.error(
            f"{_PATH}.cipher_suites",
            "names TLS 1.3 suites only, so TLS 1.3 is the only "
            f"version left, but max_version is {versions['max_version']}",
        )
    curves = tuple(name for name in _mapped(check, section, "curve_preferences", GO_CURVES) if name)
    if (cert_file is None and cert is None) or (key_file is None and key is None) or auth is None:
        return None
    return TlsSettings(
        cert_file=cert_file, key_file=key_file, client_auth_type=auth,
        client_ca_file=client_ca_file, client_ca=client_ca, client_allowed_sans=sans,
        min_version=versions["min_version"], max_version=versions["max_version"],
        prefer_server_cipher_suites=prefer, cipher_suites=tls12_suites,
        only_tls13_suites=only_tls13, curve_preferences=curves, cert=cert, key=key,
    )  # fmt: skip


def _string_list(check: Validator, section: Mapping[str, object], key: str) -> tuple[str, ...]:
    raw = section.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        check.error(f"{_PATH}.{key}", f"expected a list, got {show(raw)}")
        return ()
    items = [check.string(item, f"{_PATH}.{key}[{index}]") for index, item in enumerate(raw)]
    return tuple(item for item in items if item is not None)


def _mapped(
    check: Validator, section: Mapping[str, object], key: str, names: Mapping[str, str | None]
) -> list[str | None]:
    """A list of Go names mapped through ``names``; an unknown one is an error, as in Go."""
    chosen: list[str | None] = []
    for index, item in enumerate(_string_list(check, section, key)):
        if item not in names:
            check.error(
                f"{_PATH}.{key}[{index}]", f"unknown: {show(item)} (known: {', '.join(names)})"
            )
        else:
            chosen.append(names[item])
    return chosen


def build_ssl_context(tls: TlsSettings, source: str) -> ssl.SSLContext:
    """A server SSLContext for ``tls``; WebConfigError names the key that failed."""
    source = shown_path(source)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    errors: list[str] = []

    def fail(key: str, message: str) -> None:
        errors.append(f"{source}: {_PATH}.{key}: {message}")

    minimum = "TLS13" if tls.only_tls13_suites else tls.min_version
    try:
        context.minimum_version = TLS_VERSIONS[minimum]
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    except (ValueError, ssl.SSLError) as error:
        fail("min_version", ssl_reason(error))
    _load_certificate(context, tls, fail)
    if tls.client_auth_type != "NoClientCert":
        context.verify_mode = (
            ssl.CERT_REQUIRED
            if tls.client_auth_type in ("RequireAndVerifyClientCert", "RequireAnyClientCert")
            else ssl.CERT_OPTIONAL
        )
        # Checked without blocking before OpenSSL opens it: a FIFO would hang it (and a reload).
        ca_problem = None if tls.client_ca_file is None else check_regular_file(tls.client_ca_file)
        try:
            if tls.client_ca is not None:
                context.load_verify_locations(cadata=tls.client_ca)
            elif tls.client_ca_file is not None and ca_problem is not None:
                fail(
                    "client_ca_file", f"cannot read {shown_path(tls.client_ca_file)}: {ca_problem}"
                )
            elif tls.client_ca_file is not None:
                context.load_verify_locations(cafile=tls.client_ca_file)
            else:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (OSError, ValueError) as error:
            key = "client_ca" if tls.client_ca is not None else "client_ca_file"
            fail(key, f"cannot load client CA certificates: {ssl_reason(error)}")
    if tls.cipher_suites:
        try:
            context.set_ciphers(":".join(tls.cipher_suites))
        except ssl.SSLError as error:
            fail("cipher_suites", f"OpenSSL offers none of them: {ssl_reason(error)}")
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if len(tls.curve_preferences) == 1:
        name = {"P-256": "prime256v1", "P-384": "secp384r1", "P-521": "secp521r1"}
        context.set_ecdh_curve(name.get(tls.curve_preferences[0], tls.curve_preferences[0]))
    elif tls.curve_preferences:
        problem = _set_groups(context, ":".join(tls.curve_preferences))
        if problem is not None:
            fail("curve_preferences", problem)
    if tls.client_auth_type in ("RequestClientCert", "RequireAnyClientCert"):
        problem = _accept_any_certificate(context, tls.client_auth_type == "RequireAnyClientCert")
        if problem is not None:
            fail("client_auth_type", problem)
    if errors:
        raise WebConfigError(errors)
    return context


def _load_certificate(
    context: ssl.SSLContext, tls: TlsSettings, fail: Callable[[str, str], None]
) -> None:
    """Load the server's certificate and key from files or inline PEM (the latter through
    memory-only files, so a key given inline never touches a disk)."""
    handles: list[int] = []

    def path_of(key: str, name: str | None, inline: str | None) -> str | None:
        if name is not None:
            # Checked without blocking before OpenSSL opens it: a FIFO would hang it (and a
            # reload).
            problem = check_regular_file(name)
            if problem is not None:
                fail(key, f"cannot read {shown_path(name)}: {problem}")
                return None
            return name
        handle = os.memfd_create(f"tcpwatch-{key}", os.MFD_CLOEXEC)
        handles.append(handle)
        os.write(handle, (inline or "").encode())
        return f"/proc/self/fd/{handle}"

    try:
        cert = path_of("cert_file", tls.cert_file, tls.cert)
        key = path_of("key_file", tls.key_file, tls.key)
        if cert is None or key is None:
            return
        try:
            # Never OpenSSL's passphrase prompt: a daemon would hang reading its terminal.
            context.load_cert_chain(cert, key, password=_refuse_passphrase)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError too
            fail(
                "cert_file" if tls.cert_file is not None else "cert",
                f"cannot load the certificate {shown_path(tls.cert_file or '(inline)')} with "
                f"the key {shown_path(tls.key_file or '(inline)')}: {ssl_reason(error)}",
            )
    finally:
        for handle in handles:
            os.close(handle)


def _refuse_passphrase() -> bytes:
    raise ValueError("the key file is encrypted; tcpwatch needs an unencrypted key")


def ssl_reason(error: Exception) -> str:
    """One short line for an ssl/OS error."""
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


def _libssl() -> ctypes.CDLL:
    import _ssl  # the extension module: its libssl is the one the SSLContext lives in

    return ctypes.CDLL(getattr(_ssl, "__file__", None))


def _ssl_ctx(context: ssl.SSLContext) -> tuple[ctypes.CDLL, int] | None:
    """The OpenSSL ``SSL_CTX *`` behind ``context`` (CPython keeps it right after the object
    header), or None when that cannot be confirmed: the verify mode and options OpenSSL reports
    for the pointer must be the ones Python reports for the context."""
    try:
        libssl = _libssl()
        address = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not address:
            return None
        libssl.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        libssl.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        libssl.SSL_CTX_get_options.restype = ctypes.c_uint64
        libssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        expected_mode = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}
        if libssl.SSL_CTX_get_verify_mode(address) & 0x03 != expected_mode[context.verify_mode]:
            return None
        if libssl.SSL_CTX_get_options(address) != int(context.options):
            return None
    except (OSError, AttributeError, ValueError, KeyError):
        return None
    return libssl, address


def _set_groups(context: ssl.SSLContext, groups: str) -> str | None:
    """Set OpenSSL's key-exchange groups in preference order; an error message or None."""
    found = _ssl_ctx(context)
    if found is None:
        return "several curves need OpenSSL's groups list, unreachable from this Python: give one"
    libssl, address = found
    libssl.SSL_CTX_ctrl.restype = ctypes.c_long
    libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    if libssl.SSL_CTX_ctrl(address, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        return f"OpenSSL refused the groups {groups}"
    return None


def _always_accept(preverify_ok: int, store: int | None) -> int:
    return 1


_ACCEPT_ANY_CERTIFICATE = _VERIFY_CALLBACK(_always_accept)  # lives as long as the process


def _accept_any_certificate(context: ssl.SSLContext, require: bool) -> str | None:
    """Ask for a client certificate and take any (Go's RequestClientCert and, with ``require``,
    RequireAnyClientCert): OpenSSL's verify callback that accepts every certificate."""
    found = _ssl_ctx(context)
    if found is None:
        return "needs OpenSSL's verify callback, unreachable from this Python"
    libssl, address = found
    libssl.SSL_CTX_set_verify.restype = None
    libssl.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK]
    mode = _SSL_VERIFY_PEER | (_SSL_VERIFY_FAIL_IF_NO_PEER_CERT if require else 0)
    libssl.SSL_CTX_set_verify(address, mode, _ACCEPT_ANY_CERTIFICATE)
    return None


def client_sans(peer: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The subjectAltName values of a peer certificate (``SSLSocket.getpeercert()``), spelt as
    Go spells them (IPv6 compressed), since client_allowed_sans compares them exactly.

    Example input: ``{"subjectAltName": (("DNS", "prometheus.example.net"), ("IP Address",
    "0:0:0:0:0:0:0:1"))}`` -> ``("prometheus.example.net", "::1")``.
    """
    if not peer:
        return ()
    values = []
    for kind, value in peer.get("subjectAltName", ()):
        if kind == "IP Address":
            with contextlib.suppress(ValueError):
                value = ipaddress.ip_address(str(value).strip()).compressed
        values.append(str(value))
    return tuple(values)
