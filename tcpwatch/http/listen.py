"""The address `tcpwatch serve` listens on: ``[ADDRESS]:PORT``, parsed once, bound by the server."""

from __future__ import annotations

from dataclasses import dataclass

from tcpwatch.endpoints import endpoint


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

    Raises ListenError naming the text and what is wrong with it.
    """
    hint = 'expected [ADDRESS]:PORT, e.g. ":9477", "127.0.0.1:9477" or "[::1]:9477"'
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":") or not host:
            raise ListenError(f'listen address "{text}": {hint}')
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ListenError(f'listen address "{text}": {hint}')
        if ":" in host:
            raise ListenError(f'listen address "{text}": put an IPv6 address in brackets: {hint}')
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenError(
            f'listen address "{text}": port must be a number 0-65535, got "{port_text}"'
        )
    if any(c.isspace() for c in host):
        raise ListenError(f'listen address "{text}": {hint}')
    return ListenAddress(host, int(port_text))
