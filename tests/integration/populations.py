"""Known TCP socket populations, built inside a network namespace by helper processes.

Each builder starts this file as a helper inside the namespace (``Netns.spawn``). The helper
builds its sockets on loopback, waits until the kernel shows them in the expected states (read
from its namespace's /proc/net/tcp{,6}), prints one line ``ready {json}`` describing what it
built, and holds the sockets until killed (hard cap: the spawn lifetime, 300 s by default)::

    with Netns() as ns:
        pairs = populations.established(ns, pairs=50, port=20001)
        pairs.info["pairs"]      # 50; pairs.info["pid"] is the helper's pid in the namespace

Server ports are chosen by the caller and should lie outside ip_local_port_range; clients get
ephemeral ports. Every loop is bounded by a count and by a build deadline. This module imports
nothing from the test tree at run time, so it runs as a plain script inside the namespace.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import resource
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

    from .netns import Netns

BUILD_SECONDS = 60.0  # a builder that has not settled by then fails
HOLD_SECONDS = 300.0  # a helper's own lifetime cap once ready
READY_TIMEOUT = BUILD_SECONDS + 10.0
MAX_SOCKETS_PER_HELPER = 9_000  # fds; RLIMIT_NOFILE's hard limit here is 20,000 per process
PR_SET_NAME = 15
TCP_STATE_CODES = {
    "established": 1,
    "syn_sent": 2,
    "syn_recv": 3,
    "fin_wait1": 4,
    "fin_wait2": 5,
    "time_wait": 6,
    "close": 7,
    "close_wait": 8,
    "last_ack": 9,
    "listen": 10,
    "closing": 11,
}
_STATE_NAMES = {code: name for name, code in TCP_STATE_CODES.items()}


# -- test side ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Population:
    """A running helper and what it reported in its ready line."""

    kind: str
    process: subprocess.Popen[str]
    info: Mapping[str, Any]


def established(ns: Netns, pairs: int, port: int, address: str = "127.0.0.1") -> Population:
    """``pairs`` ESTABLISHED connections to a listener on address:port (both ends held)."""
    return _start(ns, "established", pairs=pairs, port=port, address=address)


def time_wait(
    ns: Netns, count: int, port: int, closer: str = "client", address: str = "127.0.0.1"
) -> Population:
    """``count`` TIME_WAIT sockets on the side that closes first (``client`` or ``server``).

    With ``closer="client"`` TIME_WAIT sits on the clients' ephemeral ports; with ``"server"``
    on the listener's port. The listener stays open.
    """
    if closer not in ("client", "server"):
        raise ValueError(f"closer must be 'client' or 'server', not {closer!r}")
    return _start(ns, "time_wait", count=count, port=port, closer=closer, address=address)


def close_wait(
    ns: Netns,
    count: int,
    port: int,
    process_name: str = "tw-leaker",
    orphaned: int = 0,
    address: str = "127.0.0.1",
) -> Population:
    """``count`` CLOSE_WAIT sockets held by a process named ``process_name``.

    The peers are in FIN_WAIT2: ``count - orphaned`` of them did shutdown(SHUT_WR) and keep
    their fd (full sockets); ``orphaned`` did close() (orphaned FIN_WAIT2, which the kernel keeps
    as a timewait socket for tcp_fin_timeout).
    """
    if len(process_name.encode()) > 15:
        raise ValueError(f"process name {process_name!r} is longer than 15 bytes")
    return _start(
        ns,
        "close_wait",
        count=count,
        port=port,
        process_name=process_name,
        orphaned=orphaned,
        address=address,
    )


def syn_sent(ns: Netns, count: int, port: int, address: str = "127.0.0.1") -> Population:
    """``count`` SYN_SENT sockets towards address:port, whose SYNs an nft rule drops."""
    _nft_drop(ns, f"tw_syn_sent_{port}", port, "tcp flags & (syn|ack) == syn")
    return _start(ns, "syn_sent", count=count, port=port, address=address)


def syn_recv(
    ns: Netns,
    count: int,
    port: int,
    address: str = "127.0.0.1",
    listen_address: str | None = None,
) -> Population:
    """``count`` request sockets (SYN_RECV) on a listener whose final ACKs an nft rule drops.

    Clients connect to ``address``; the listener binds ``listen_address`` (default: the same;
    ``"::"`` makes a dual-stack listener). The clients see the SYN-ACK and become ESTABLISHED;
    the listener's backlog is large enough that its SYN queue never fills (no syncookies).
    """
    _nft_drop(ns, f"tw_syn_recv_{port}", port, "tcp flags & (syn|ack|fin|rst) == ack")
    return _start(
        ns,
        "syn_recv",
        count=count,
        port=port,
        address=address,
        listen_address=address if listen_address is None else listen_address,
    )


def accept_queue_full(
    ns: Netns,
    port: int,
    backlog: int = 4,
    overflowing: int = 3,
    address: str = "127.0.0.1",
    process_name: str | None = None,
) -> Population:
    """A listener with listen(backlog) that never accepts: its queue holds backlog + 1.

    Then ``overflowing`` more connects are made; their SYNs are dropped (ListenOverflows and
    ListenDrops move by at least one each) and the helper closes them once the counter moved,
    so the population is quiet again when it reports ready. ``process_name``: what the helper
    calls itself (prctl PR_SET_NAME, at most 15 bytes), the name tcpwatch reports as the owner.
    """
    if process_name is not None and len(process_name.encode()) > 15:
        raise ValueError(f"process name {process_name!r} is longer than 15 bytes")
    return _start(
        ns,
        "accept_queue_full",
        port=port,
        backlog=backlog,
        overflowing=overflowing,
        address=address,
        process_name=process_name,
    )


def dual_stack(ns: Netns, ipv4_clients: int, ipv6_clients: int, port: int) -> Population:
    """A [::] listener with IPV6_V6ONLY=0 taking IPv4 (127.0.0.1) and IPv6 (::1) clients."""
    return _start(ns, "dual_stack", ipv4_clients=ipv4_clients, ipv6_clients=ipv6_clients, port=port)


def reuseport(
    ns: Netns,
    port: int,
    backlogs: Iterable[int] = (16, 24),
    clients: int = 12,
    address: str = "127.0.0.1",
) -> Population:
    """SO_REUSEPORT listeners on one address:port (one per backlog), never accepting.

    ``clients`` connects are spread by the kernel's hash; ready reports each listener's inode.
    """
    return _start(
        ns, "reuseport", port=port, backlogs=list(backlogs), clients=clients, address=address
    )


def fd_limited_listener(
    ns: Netns, port: int, files: int = 100, fill: float = 1.0, address: str = "127.0.0.1"
) -> Population:
    """A listener whose process holds ``files`` more descriptors (/dev/null) and then lowers its
    own RLIMIT_NOFILE soft limit so that its open descriptors are ``fill`` of it (1.0: the next
    accept() fails with EMFILE). Ready reports ``open_fds`` and ``soft_limit``."""
    return _start(ns, "fd_limited_listener", port=port, files=files, fill=fill, address=address)


# One port per kind, below the default ip_local_port_range, so every kind fits in one namespace.
STANDARD_PORTS: Mapping[str, int] = {
    "established": 20001,
    "established_ipv6": 20002,
    "time_wait_client": 20003,
    "time_wait_server": 20004,
    "close_wait": 20005,
    "syn_sent": 20006,
    "syn_recv": 20007,
    "accept_queue_full": 20008,
    "dual_stack": 20009,
    "reuseport": 20010,
    "syn_sent_ipv6": 20011,
    "syn_recv_ipv6": 20012,
    "syn_recv_dual_stack": 20013,
}
STANDARD_PROCESS_NAME = "tw-leaker"


def standard(ns: Netns, kind: str) -> Population:
    """One population of each kind at a modest size, on its STANDARD_PORTS port."""
    port = STANDARD_PORTS[kind]
    if kind == "established":
        return established(ns, pairs=40, port=port)
    if kind == "established_ipv6":
        return established(ns, pairs=30, port=port, address="::1")
    if kind == "time_wait_client":
        return time_wait(ns, count=25, port=port, closer="client")
    if kind == "time_wait_server":
        return time_wait(ns, count=20, port=port, closer="server", address="::1")
    if kind == "close_wait":
        return close_wait(ns, count=16, port=port, process_name=STANDARD_PROCESS_NAME, orphaned=6)
    if kind == "syn_sent":
        return syn_sent(ns, count=9, port=port)
    if kind == "syn_recv":
        return syn_recv(ns, count=11, port=port)
    if kind == "accept_queue_full":
        return accept_queue_full(ns, port=port, backlog=4, overflowing=3)
    if kind == "dual_stack":
        return dual_stack(ns, ipv4_clients=10, ipv6_clients=4, port=port)
    if kind == "reuseport":
        return reuseport(ns, port=port, backlogs=(16, 24), clients=12)
    if kind == "syn_sent_ipv6":
        return syn_sent(ns, count=5, port=port, address="::1")
    if kind == "syn_recv_ipv6":
        return syn_recv(ns, count=7, port=port, address="::1")
    if kind == "syn_recv_dual_stack":
        return syn_recv(ns, count=8, port=port, address="127.0.0.1", listen_address="::")
    raise ValueError(f"unknown population kind {kind!r}; known: {', '.join(STANDARD_PORTS)}")


def standard_set(ns: Netns) -> list[Population]:
    """Every standard population side by side in one namespace."""
    return [standard(ns, kind) for kind in STANDARD_PORTS]


def _nft_drop(ns: Netns, table: str, port: int, match: str) -> None:
    ns.nft(
        f"table inet {table} {{\n"
        f"  chain input {{ type filter hook input priority 0; tcp dport {port} {match} drop; }}\n"
        f"}}\n"
    )


def _start(ns: Netns, kind: str, **params: Any) -> Population:
    process = ns.spawn(
        [sys.executable, os.path.abspath(__file__), kind, json.dumps(params)],
        lifetime=BUILD_SECONDS + HOLD_SECONDS + 10.0,
    )
    line = ns.read_line(process, timeout=READY_TIMEOUT)
    if not line.startswith("ready "):
        raise RuntimeError(f"{kind} helper said {line!r}; stderr: {ns.stderr_of(process)!r}")
    return Population(kind, process, json.loads(line[len("ready ") :]))


# -- helper side (runs inside the namespace) ------------------------------------------------------


class BuildError(Exception):
    """The population could not be built or did not settle in time."""


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _listener(address: str, port: int, backlog: int, reuseport: bool = False) -> socket.socket:
    """A listener on address:port; ``::`` is dual-stack (IPV6_V6ONLY=0, whatever the sysctl)."""
    listener = socket.socket(_family(address), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if address == "::":
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if reuseport:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((address, port))
    listener.listen(backlog)
    return listener


def _connect(address: str, port: int, deadline: float) -> socket.socket:
    client = socket.socket(_family(address), socket.SOCK_STREAM)
    client.settimeout(max(deadline - time.monotonic(), 0.1))
    client.connect((address, port))
    return client


def _connect_nonblocking(address: str, port: int) -> socket.socket:
    client = socket.socket(_family(address), socket.SOCK_STREAM)
    client.setblocking(False)
    error = client.connect_ex((address, port))
    if error not in (0, 115):  # EINPROGRESS
        client.close()
        raise BuildError(f"connect to {address}:{port} failed: {os.strerror(error)}")
    return client


def _accept(listener: socket.socket, deadline: float) -> socket.socket:
    listener.settimeout(max(deadline - time.monotonic(), 0.1))
    server, _ = listener.accept()
    return server


def _wait_eof(sock: socket.socket, deadline: float) -> None:
    sock.settimeout(max(deadline - time.monotonic(), 0.1))
    if sock.recv(1) != b"":
        raise BuildError("expected the peer's FIN, got data")


def _port_states(port: int) -> Counter[tuple[str, str]]:
    """(side, state) counts of this namespace's TCP sockets whose local or peer port is ``port``.

    side is ``server`` when the local port is ``port``, ``client`` when the peer port is.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name, encoding="ascii") as table:
            next(table)  # header
            for line in table:
                words = line.split()
                local_port = int(words[1].rsplit(":", 1)[1], 16)
                peer_port = int(words[2].rsplit(":", 1)[1], 16)
                state = _STATE_NAMES.get(int(words[3], 16), words[3])
                if local_port == port:
                    counts[("server", state)] += 1
                if peer_port == port:
                    counts[("client", state)] += 1
    return counts


def _settle(
    port: int, expected: Mapping[tuple[str, str], int], deadline: float
) -> dict[str, dict[str, int]]:
    """Wait until the sockets on ``port`` are exactly ``expected`` (zero counts omitted).

    Returns them for the ready line: ``{"server": {"listen": 1}, "client": {"time_wait": 5}}``.
    """
    wanted = Counter({key: value for key, value in expected.items() if value})
    while True:
        seen = _port_states(port)
        if seen == wanted:
            report: dict[str, dict[str, int]] = {"server": {}, "client": {}}
            for (side, state), count in sorted(wanted.items()):
                report[side][state] = count
            return report
        if time.monotonic() > deadline:
            raise BuildError(f"port {port}: sockets {dict(seen)} never became {dict(wanted)}")
        time.sleep(0.02)


def _netstat(name: str) -> int:
    """A TcpExt counter of this namespace from /proc/net/netstat."""
    with open("/proc/net/netstat", encoding="ascii") as table:
        lines = table.read().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        names, numbers = header.split(), values.split()
        if names[0] == "TcpExt:" and name in names:
            return int(numbers[names.index(name)])
    raise BuildError(f"TcpExt {name} not in /proc/net/netstat")


def _check_size(sockets: int) -> None:
    if not 0 <= sockets <= MAX_SOCKETS_PER_HELPER:
        raise BuildError(f"{sockets} sockets is outside 0..{MAX_SOCKETS_PER_HELPER} per helper")


def _set_name(name: str) -> None:
    """What the kernel calls this process from now on (/proc/PID/comm, ss -p, psutil)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0) != 0:
        raise BuildError(f"prctl(PR_SET_NAME): {os.strerror(ctypes.get_errno())}")


def build_established(
    held: list[socket.socket], deadline: float, pairs: int, port: int, address: str
) -> dict[str, Any]:
    _check_size(2 * pairs)
    listener = _listener(address, port, min(pairs + 16, 4096))
    held.append(listener)
    for _ in range(pairs):
        held.append(_connect(address, port, deadline))
        held.append(_accept(listener, deadline))
    sockets = _settle(
        port,
        {
            ("server", "listen"): 1,
            ("server", "established"): pairs,
            ("client", "established"): pairs,
        },
        deadline,
    )
    return {"sockets": sockets, "pairs": pairs, "port": port, "address": address}


def build_time_wait(
    held: list[socket.socket], deadline: float, count: int, port: int, closer: str, address: str
) -> dict[str, Any]:
    _check_size(2 * count)
    listener = _listener(address, port, min(count + 16, 4096))
    held.append(listener)
    pairs = []
    for _ in range(count):
        client = _connect(address, port, deadline)
        pairs.append((client, _accept(listener, deadline)))
    for client, server in pairs:
        first, second = (client, server) if closer == "client" else (server, client)
        first.close()
        _wait_eof(second, deadline)
        second.close()
    sockets = _settle(port, {("server", "listen"): 1, (closer, "time_wait"): count}, deadline)
    return {"sockets": sockets, "count": count, "port": port, "closer": closer, "address": address}


def build_close_wait(
    held: list[socket.socket],
    deadline: float,
    count: int,
    port: int,
    process_name: str,
    orphaned: int,
    address: str,
) -> dict[str, Any]:
    _check_size(2 * count)
    if not 0 <= orphaned <= count:
        raise BuildError(f"orphaned={orphaned} must lie in 0..{count}")
    _set_name(process_name)
    listener = _listener(address, port, min(count + 16, 4096))
    held.append(listener)
    servers = []
    for index in range(count):
        client = _connect(address, port, deadline)
        server = _accept(listener, deadline)
        servers.append(server)
        if index < orphaned:
            client.close()
        else:
            client.shutdown(socket.SHUT_WR)
            held.append(client)
    held.extend(servers)
    for server in servers:
        _wait_eof(server, deadline)  # the FIN arrived: CLOSE_WAIT on our side
    sockets = _settle(
        port,
        {("server", "listen"): 1, ("server", "close_wait"): count, ("client", "fin_wait2"): count},
        deadline,
    )
    server_inodes = sorted(os.fstat(server.fileno()).st_ino for server in servers)
    return {
        "sockets": sockets,
        "count": count,
        "port": port,
        "process_name": process_name,
        "orphaned": orphaned,
        "address": address,
        "close_wait_inodes": server_inodes,
    }


def build_syn_sent(
    held: list[socket.socket], deadline: float, count: int, port: int, address: str
) -> dict[str, Any]:
    _check_size(count)
    for _ in range(count):
        held.append(_connect_nonblocking(address, port))
    sockets = _settle(port, {("client", "syn_sent"): count}, deadline)
    return {"sockets": sockets, "count": count, "port": port, "address": address}


def build_syn_recv(
    held: list[socket.socket],
    deadline: float,
    count: int,
    port: int,
    address: str,
    listen_address: str,
) -> dict[str, Any]:
    _check_size(count)
    listener = _listener(listen_address, port, min(2 * count + 16, 4096))
    held.append(listener)
    for _ in range(count):
        held.append(_connect_nonblocking(address, port))
    sockets = _settle(
        port,
        {("server", "listen"): 1, ("server", "syn_recv"): count, ("client", "established"): count},
        deadline,
    )
    return {
        "sockets": sockets,
        "count": count,
        "port": port,
        "address": address,
        "listen_address": listen_address,
    }


def build_accept_queue_full(
    held: list[socket.socket],
    deadline: float,
    port: int,
    backlog: int,
    overflowing: int,
    address: str,
    process_name: str | None = None,
) -> dict[str, Any]:
    _check_size(2 * (backlog + 1) + overflowing)
    if process_name is not None:
        _set_name(process_name)
    listener = _listener(address, port, backlog)
    held.append(listener)
    queued = backlog + 1  # the kernel admits one more than the backlog (full means >, not >=)
    for _ in range(queued):
        held.append(_connect(address, port, deadline))
    _settle(
        port,
        {
            ("server", "listen"): 1,
            ("server", "established"): queued,
            ("client", "established"): queued,
        },
        deadline,
    )
    before = _netstat("ListenOverflows")
    pending = [_connect_nonblocking(address, port) for _ in range(overflowing)]
    while _netstat("ListenOverflows") < before + overflowing:
        if time.monotonic() > deadline:
            raise BuildError(f"ListenOverflows stayed at {_netstat('ListenOverflows')}")
        time.sleep(0.01)
    for client in pending:
        client.close()  # closing a SYN_SENT socket ends it at once: no more retransmitted SYNs
    sockets = _settle(
        port,
        {
            ("server", "listen"): 1,
            ("server", "established"): queued,
            ("client", "established"): queued,
        },
        deadline,
    )
    return {
        "sockets": sockets,
        "port": port,
        "address": address,
        "backlog": backlog,
        "queue_length": queued,
        "overflows": _netstat("ListenOverflows") - before,
    }


def build_dual_stack(
    held: list[socket.socket], deadline: float, ipv4_clients: int, ipv6_clients: int, port: int
) -> dict[str, Any]:
    _check_size(2 * (ipv4_clients + ipv6_clients))
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", port))
    listener.listen(min(ipv4_clients + ipv6_clients + 16, 4096))
    held.append(listener)
    for address, clients in (("127.0.0.1", ipv4_clients), ("::1", ipv6_clients)):
        for _ in range(clients):
            held.append(_connect(address, port, deadline))
            held.append(_accept(listener, deadline))
    total = ipv4_clients + ipv6_clients
    sockets = _settle(
        port,
        {
            ("server", "listen"): 1,
            ("server", "established"): total,
            ("client", "established"): total,
        },
        deadline,
    )
    return {
        "sockets": sockets,
        "port": port,
        "ipv4_clients": ipv4_clients,
        "ipv6_clients": ipv6_clients,
    }


def build_reuseport(
    held: list[socket.socket],
    deadline: float,
    port: int,
    backlogs: list[int],
    clients: int,
    address: str,
) -> dict[str, Any]:
    _check_size(2 * clients + len(backlogs))
    if clients > sum(backlogs):
        raise BuildError(f"{clients} clients would overflow backlogs {backlogs}")
    listeners = [_listener(address, port, backlog, reuseport=True) for backlog in backlogs]
    held.extend(listeners)
    for _ in range(clients):
        held.append(_connect(address, port, deadline))
    sockets = _settle(
        port,
        {
            ("server", "listen"): len(backlogs),
            ("server", "established"): clients,
            ("client", "established"): clients,
        },
        deadline,
    )
    return {
        "sockets": sockets,
        "port": port,
        "address": address,
        "backlogs": backlogs,
        "clients": clients,
        "inodes": [os.fstat(listener.fileno()).st_ino for listener in listeners],
    }


def build_fd_limited_listener(
    held: list[socket.socket], deadline: float, port: int, files: int, fill: float, address: str
) -> dict[str, Any]:
    _check_size(files + 1)
    held.append(_listener(address, port, 16))
    # Raw descriptors, never closed: they live as long as the helper.
    opened = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(files)]
    open_fds = len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own descriptor
    soft = max(int(open_fds / fill), open_fds)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"port": port, "files": len(opened), "open_fds": open_fds, "soft_limit": soft}


_BUILDERS: Mapping[str, Callable[..., dict[str, Any]]] = {
    "established": build_established,
    "time_wait": build_time_wait,
    "close_wait": build_close_wait,
    "syn_sent": build_syn_sent,
    "syn_recv": build_syn_recv,
    "accept_queue_full": build_accept_queue_full,
    "dual_stack": build_dual_stack,
    "reuseport": build_reuseport,
    "fd_limited_listener": build_fd_limited_listener,
}


def main(argv: list[str]) -> int:
    """``populations.py KIND JSON_PARAMS``: build, print ``ready {json}``, hold until killed."""
    if len(argv) != 3 or argv[1] not in _BUILDERS:
        print(f"usage: {argv[0]} {{{','.join(_BUILDERS)}}} JSON_PARAMS", file=sys.stderr)
        return 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[socket.socket] = []
    try:
        info = _BUILDERS[argv[1]](held, time.monotonic() + BUILD_SECONDS, **json.loads(argv[2]))
    except (BuildError, OSError) as error:
        print(f"{argv[1]}: {error}", file=sys.stderr)
        return 1
    info = {"kind": argv[1], "pid": os.getpid(), **info}
    print("ready " + json.dumps(info), flush=True)
    # Hold the sockets until killed or HOLD_SECONDS pass (the spawn's `timeout -s KILL` wrapper
    # is the backstop). select() on nothing sleeps without a busy loop.
    end = time.monotonic() + HOLD_SECONDS
    while (left := end - time.monotonic()) > 0:
        select.select([], [], [], min(left, 60.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
