"""How addresses, ports and port ranges are written and counted: one place for every layer."""

from __future__ import annotations

from collections.abc import Sequence


def endpoint(address: str, port: int) -> str:
    """An address and port as users write them: "10.0.0.5:5432", "[::1]:8080"."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def ports_available(low: int, high: int, reserved: Sequence[tuple[int, int]]) -> int:
    """Ports of [low, high] that connect() may pick: the range minus ip_local_reserved_ports.

    Arithmetic over the ranges, never a loop over ports: the ranges come from the kernel.
    """
    taken = 0
    counted_to = low - 1  # reserved ranges may overlap (a fixture tree's): count a port once
    for start, end in sorted(reserved):
        start, end = max(start, counted_to + 1, low), min(end, high)
        if start <= end:
            taken += end - start + 1
            counted_to = end
    return max(high - low + 1 - taken, 0)


def local_daemon_url(listen: str) -> str:
    """Where the local daemon answers, from its listen address (``:9477`` -> loopback): what
    `top` reads and `check` asks for owners without being told (``--from``)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port or 9477}"
