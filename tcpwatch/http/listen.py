"""The address `tcpwatch serve` listens on: ``[ADDRESS]:PORT``, parsed once, and its socket."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any

from tcpwatch.endpoints import endpoint
from tcpwatch.validation import MAX_SHOWN_CHARS, one_line


class ListenError(Exception):
    """The listen address is malformed, cannot be resolved, or cannot be bound: one line."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A parsed ``[ADDRESS]:PORT``; ``host`` "" means every address (IPv6 and IPv4)."""

    host: str
    port: int

    def __str__(self) -> str:
        return endpoint(self.host, self.port)


def parse_listen(text: str) -> ListenAddress:
    """``:9477``, ``127.0.0.1:9477``, ``[::1]:9477``, ``localhost:9477`` -> ListenAddress.

    Raises ListenError naming the text and what is wrong with it, in one bounded line: the port
    is 1-5 ASCII digits, a bracketed host an IPv6 address, any other host an IPv4 address or a
    host name that resolves can take (labels of 1-63 characters, 253 in all, valid IDNA).
    """
    shown = f'listen address "{one_line(text, MAX_SHOWN_CHARS)}"'
    hint = 'expected [ADDRESS]:PORT, e.g. ":9477", "127.0.0.1:9477" or "[::1]:9477"'
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":") or not host:
            raise ListenError(f"{shown}: {hint}")
        port_text = rest[1:]
        problem = _ipv6_problem(host)
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ListenError(f"{shown}: {hint}")
        if ":" in host:
            raise ListenError(f"{shown}: put an IPv6 address in brackets: {hint}")
        problem = _host_problem(host) if host else None
    # ASCII digits only: str.isdigit() also takes "²", and int() reads "٣" as 3.
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ListenError(
            f'{shown}: port must be a number 0-65535, got "{one_line(port_text, 20)}"'
        )
    if problem is not None:
        raise ListenError(f"{shown}: {problem}")
    return ListenAddress(host, int(port_text))


_PORT = re.compile(r"[0-9]{1,5}")
# What getaddrinfo() takes in a host name label once IDNA-encoded (underscores for /etc/hosts).
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def _ipv6_problem(host: str) -> str | None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f'"{one_line(host, MAX_SHOWN_CHARS)}" in brackets is not an IPv6 address'
    return None


def _host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IPv4 address nor a valid host name, or None."""
    try:
        ipaddress.IPv4Address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host  # a fully qualified "example.net."
    if len(name) > 253:
        return f"a host name is at most 253 characters, this one has {len(name)}"
    for label in name.split("."):
        if not label:
            return "a host name has an empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"a host name label is at most 63 characters, one has {len(label)}"
    try:
        # The codec getaddrinfo() applies to a str host: its errors would be a traceback there.
        encoded = name.encode("idna").decode("ascii")
    except UnicodeError as error:
        reason = one_line(str(error), MAX_SHOWN_CHARS)
        return f"not a valid host name ({reason})"
    for label in encoded.split("."):
        if len(label) > 63 or not _LABEL.fullmatch(label):
            shown = one_line(label, MAX_SHOWN_CHARS)
            return (
                f'not a valid host name: label "{shown}" (letters, digits and inner "-", '
                "1-63 characters each)"
            )
    if len(encoded) > 253:
        return f"a host name is at most 253 characters once encoded, this one has {len(encoded)}"
    return None


def bind(listen: ListenAddress) -> socket.socket:
    """A listening socket for ``listen``; ListenError (one line) when it cannot be bound."""
    if listen.host == "":
        try:
            return _listening(socket.AF_INET6, ("::", listen.port), dual_stack=True)
        except OSError as error:
            if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise ListenError(_bind_failure(listen, error)) from None
        # No IPv6 in this kernel or namespace: every IPv4 address will do.
        return _try_bind(listen, socket.AF_INET, ("0.0.0.0", listen.port))
    try:
        infos = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(
            f'cannot listen on {listen}: cannot resolve "{listen.host}": {error.strerror}'
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return _try_bind(listen, family, sockaddr)


def _listening(
    family: socket.AddressFamily, address: tuple[Any, ...], dual_stack: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        # As Go's net: as long a backlog as net.core.somaxconn allows (the kernel caps it), so a
        # connect flood overflows it later and a scraper's SYN is less often dropped.
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return sock


def _try_bind(
    listen: ListenAddress, family: socket.AddressFamily, address: tuple[Any, ...]
) -> socket.socket:
    try:
        return _listening(family, address)
    except OSError as error:
        raise ListenError(_bind_failure(listen, error)) from None


def _bind_failure(listen: ListenAddress, error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        reason = "the port is already in use (another tcpwatch or exporter running?)"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = "no interface of this host has that address"
    elif error.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    return f"cannot listen on {listen}: {reason}"
