"""Socket populations for the poll benchmark: what to build, and the helper processes that build it.

A plan says, per helper process, which listeners it opens and which loopback connections it makes,
and how each connection ends: kept ESTABLISHED, turned into TIME_WAIT by the side that closes
first, or half-closed (CLOSE_WAIT on one side, FIN_WAIT2 on the other). Each helper holds both
ends of its ESTABLISHED pairs, so it stays under the per-process RLIMIT_NOFILE hard limit
(20,000 here); TIME_WAIT sockets hold no fd.

Helpers run inside the benchmark's network namespace (``python populations.py helper``) and take
commands as JSON lines on stdin, answering each with one JSON line on stdout::

    > {"op": "listen", "listeners": [["127.0.1.1", 8443]]}
    < {"ok": true, "made": 1, "seconds": 0.0001, "fds": 4}
    > {"op": "connect", "batch": {"count": 9900, "destinations": [["127.0.1.1", 8443]],
       "ending": "established", "source_addresses": [], "bound_start": 0}}
    < {"ok": true, "made": 9900, "seconds": 0.52, "fds": 19804}
    > {"op": "exit"}

Client sockets bind in one of two ways, which is what separates the profiles:

* bound: connection ``i`` binds ``bound_endpoint(bound_start + i)``, an address in 127.10.0.0/16
  and a port *below* ``ip_local_port_range``. Such a socket is not "outbound from an ephemeral
  port"; it stands in for the remote client of a server.
* ephemeral: the socket binds only its source address (``IP_BIND_ADDRESS_NO_PORT``) and the
  kernel picks the port from ``ip_local_port_range`` at connect(), as for any outbound
  connection. Several source addresses keep each (source, destination, port) well below the
  ~28k ports the range allows, so connect() never has to search a nearly full range.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

# Per helper: the RLIMIT_NOFILE hard limit is 20,000; stdio, listeners and the two sockets of a
# TIME_WAIT connection in flight need a few more.
FD_BUDGET = 19_800
# Sockets per (source address, destination, port) on ephemeral ports: connect() finds a free port
# at once while the range (28,232 ports by default) is less than a third used.
EPHEMERAL_PER_TUPLE = 8_000
BOUND_LOW_PORT = 1024
COMMAND_TIMEOUT = 300.0  # seconds one helper command may take before the helper gives up
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; Python 3.11's socket module lacks the name

ENDINGS = (
    "established",  # keep both ends open
    "time_wait_client",  # client closes first: TIME_WAIT on the client (connecting) side
    "time_wait_server",  # server closes first: TIME_WAIT on the accepted side
    "close_wait_server",  # client shuts down its write side: server CLOSE_WAIT, client FIN_WAIT2
    "close_wait_client",  # server shuts down its write side: client CLOSE_WAIT, server FIN_WAIT2
)
PROFILES = ("server", "client")


class PopulationError(Exception):
    """A helper failed, answered nonsense, or took too long."""


@dataclass(frozen=True, slots=True)
class ConnectionBatch:
    """Connections one helper makes, to its own listeners, round robin over ``destinations``."""

    count: int
    destinations: tuple[tuple[str, int], ...]
    ending: str
    source_addresses: tuple[str, ...] = ()  # ephemeral ports from these addresses, round robin
    bound_start: int | None = None  # bound: connection i binds bound_endpoint(bound_start + i)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConnectionBatch:
        return cls(
            count=int(data["count"]),
            destinations=tuple((str(a), int(p)) for a, p in data["destinations"]),
            ending=str(data["ending"]),
            source_addresses=tuple(str(a) for a in data["source_addresses"]),
            bound_start=None if data["bound_start"] is None else int(data["bound_start"]),
        )


@dataclass(frozen=True, slots=True)
class HelperPlan:
    listeners: tuple[tuple[str, int], ...]
    persistent: tuple[ConnectionBatch, ...]  # made once
    time_wait: tuple[ConnectionBatch, ...]  # made again each time the last batch has expired


@dataclass(frozen=True, slots=True)
class PopulationPlan:
    profile: str
    size: int
    port_range: tuple[int, int]
    helpers: tuple[HelperPlan, ...]
    expected: Mapping[str, int]  # state -> sockets the helpers make (both families)
    composition: tuple[tuple[str, int], ...]  # (what, sockets), for the report
    ephemeral_outbound: int  # sockets on an ephemeral local port: what the filtered dump copies

    @property
    def time_wait_target(self) -> int:
        return self.expected.get("time_wait", 0)


def bound_endpoint(index: int, port_range: tuple[int, int]) -> tuple[str, int]:
    """The index-th (address, port) below the ephemeral range: 127.10.0.1:1024, :1025, ...

    >>> bound_endpoint(0, (32768, 60999))
    ('127.10.0.1', 1024)
    >>> bound_endpoint(31744, (32768, 60999))
    ('127.10.0.2', 1024)
    """
    per_address = port_range[0] - BOUND_LOW_PORT
    number, port_offset = divmod(index, per_address)
    if number >= 250 * 250:
        raise PopulationError(f"bound endpoint {index} is beyond 127.10.0.0/16")
    return f"127.10.{number // 250}.{number % 250 + 1}", BOUND_LOW_PORT + port_offset


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as whole numbers allow.

    >>> split(10, 3)
    [4, 3, 3]
    """
    base, extra = divmod(total, parts)
    return [base + (1 if part < extra else 0) for part in range(parts)]


def _ephemeral_sources(helper: int, load: int, destinations: int) -> tuple[str, ...]:
    count = max(1, math.ceil(load / (EPHEMERAL_PER_TUPLE * destinations)))
    if count > 250:
        raise PopulationError(f"helper {helper} needs {count} source addresses (at most 250)")
    return tuple(f"127.30.{helper}.{n + 1}" for n in range(count))


def _helper_count(fds: int) -> int:
    # At least two: the machine has two cores and TIME_WAIT refills run on every helper at once.
    return max(2, math.ceil(fds / FD_BUDGET))


def plan_population(profile: str, size: int, port_range: tuple[int, int]) -> PopulationPlan:
    """Plan ``size`` sockets (plus a few listeners) of the given profile.

    server: 88% ESTABLISHED between a service (port 8443) and clients bound to ports below the
    ephemeral range, 2% ESTABLISHED backend connections from ephemeral ports to port 5432 (1%
    outbound + 1% their accepted ends), 0.1% CLOSE_WAIT on the service side with their FIN_WAIT2
    peers, the rest (~9.8%) TIME_WAIT on the service side (the server closed first).
    client: 60% ESTABLISHED from ephemeral ports to two destinations per helper (ports 5432 and
    6379; half of these sockets are the accepted ends), 0.1% CLOSE_WAIT on the ephemeral side with
    FIN_WAIT2 peers, the rest (~39.8%) TIME_WAIT on the ephemeral side (the client closed first).
    """
    if size < 1000:
        raise PopulationError(f"population size {size} is below 1000")
    close_wait_pairs = max(10, size // 1000)
    if profile == "server":
        inbound_pairs = size * 44 // 100
        backend_pairs = size // 100
        pairs = inbound_pairs + backend_pairs + close_wait_pairs
        time_wait = size - 2 * pairs
        helpers = _helper_count(2 * pairs)
        next_bound = 0
        plans: list[HelperPlan] = []
        for n, (inbound, backend, close_wait, tw) in enumerate(
            zip(
                split(inbound_pairs, helpers),
                split(backend_pairs, helpers),
                split(close_wait_pairs, helpers),
                split(time_wait, helpers),
                strict=True,
            )
        ):
            service = (f"127.0.1.{n + 1}", 8443)
            database = (f"127.0.2.{n + 1}", 5432)
            sources = _ephemeral_sources(n, backend, 1)
            persistent: tuple[ConnectionBatch, ...] = (
                ConnectionBatch(inbound, (service,), "established", bound_start=next_bound),
                ConnectionBatch(backend, (database,), "established", source_addresses=sources),
                ConnectionBatch(
                    close_wait, (service,), "close_wait_server", bound_start=next_bound + inbound
                ),
            )
            next_bound += inbound + close_wait
            refill = (ConnectionBatch(tw, (service,), "time_wait_server", bound_start=next_bound),)
            next_bound += tw
            plans.append(HelperPlan((service, database), persistent, refill))
        bound_endpoint(next_bound, port_range)  # fails early when 127.10/16 cannot hold them
        expected = {
            "established": 2 * (inbound_pairs + backend_pairs),
            "close_wait": close_wait_pairs,
            "fin_wait2": close_wait_pairs,
            "time_wait": time_wait,
            "listen": 2 * helpers,
        }
        composition: tuple[tuple[str, int], ...] = (
            ("inbound ESTABLISHED, service side (local port 8443)", inbound_pairs),
            ("ESTABLISHED clients of the service, bound below the ephemeral range", inbound_pairs),
            ("outbound ESTABLISHED from ephemeral ports (backend connections)", backend_pairs),
            ("inbound ESTABLISHED, backend side (local port 5432)", backend_pairs),
            ("TIME_WAIT, service side (server closed first)", time_wait),
            ("CLOSE_WAIT, service side", close_wait_pairs),
            ("FIN_WAIT2, their clients (bound below the ephemeral range)", close_wait_pairs),
            ("LISTEN", 2 * helpers),
        )
        ephemeral = backend_pairs
    elif profile == "client":
        outbound_pairs = size * 30 // 100
        pairs = outbound_pairs + close_wait_pairs
        time_wait = size - 2 * pairs
        helpers = _helper_count(2 * pairs)
        plans = []
        for n, (outbound, close_wait, tw) in enumerate(
            zip(
                split(outbound_pairs, helpers),
                split(close_wait_pairs, helpers),
                split(time_wait, helpers),
                strict=True,
            )
        ):
            destinations = ((f"127.0.3.{n + 1}", 5432), (f"127.0.3.{n + 1}", 6379))
            sources = _ephemeral_sources(n, outbound + close_wait + tw, len(destinations))
            persistent = (
                ConnectionBatch(outbound, destinations, "established", source_addresses=sources),
                ConnectionBatch(
                    close_wait, destinations, "close_wait_client", source_addresses=sources
                ),
            )
            refill = (
                ConnectionBatch(tw, destinations, "time_wait_client", source_addresses=sources),
            )
            plans.append(HelperPlan(destinations, persistent, refill))
        expected = {
            "established": 2 * outbound_pairs,
            "close_wait": close_wait_pairs,
            "fin_wait2": close_wait_pairs,
            "time_wait": time_wait,
            "listen": 2 * helpers,
        }
        composition = (
            ("outbound ESTABLISHED from ephemeral ports", outbound_pairs),
            ("inbound ESTABLISHED, their accepted ends (ports 5432, 6379)", outbound_pairs),
            ("TIME_WAIT on ephemeral ports (client closed first)", time_wait),
            ("CLOSE_WAIT on ephemeral ports", close_wait_pairs),
            ("FIN_WAIT2, their accepted ends", close_wait_pairs),
            ("LISTEN", 2 * helpers),
        )
        ephemeral = outbound_pairs + close_wait_pairs + time_wait
    else:
        raise PopulationError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    return PopulationPlan(
        profile=profile,
        size=size,
        port_range=port_range,
        helpers=tuple(plans),
        expected=expected,
        composition=composition,
        ephemeral_outbound=ephemeral,
    )


# ---------------------------------------------------------------------------------------------
# The helper process (runs inside the namespace).


def _finish(
    ending: str, client: socket.socket, server: socket.socket, held: list[socket.socket]
) -> None:
    # Each step waits for the peer to see the FIN (recv returns b""), so the two closes never
    # cross: crossing FINs would leave TIME_WAIT on both sides.
    if ending == "established":
        held += (client, server)
    elif ending == "time_wait_client":
        client.close()
        _expect_eof(server)
        server.close()
    elif ending == "time_wait_server":
        server.close()
        _expect_eof(client)
        client.close()
    elif ending == "close_wait_server":
        client.shutdown(socket.SHUT_WR)
        _expect_eof(server)
        held += (client, server)
    elif ending == "close_wait_client":
        server.shutdown(socket.SHUT_WR)
        _expect_eof(client)
        held += (client, server)
    else:
        raise PopulationError(f"unknown ending {ending!r}")


def _expect_eof(sock: socket.socket) -> None:
    data = sock.recv(1)
    if data:
        raise PopulationError(f"expected the peer's FIN, got {data!r}")


def make_connections(
    batch: ConnectionBatch,
    listeners: Mapping[tuple[str, int], socket.socket],
    held: list[socket.socket],
    port_range: tuple[int, int],
    deadline: float,
) -> int:
    """Connect, accept and finish ``batch.count`` connections; bounded by ``deadline``."""
    destinations = batch.destinations
    sources = batch.source_addresses
    for index in range(batch.count):
        if index % 512 == 0 and time.monotonic() > deadline:
            raise PopulationError(f"made {index} of {batch.count} connections before the deadline")
        destination = destinations[index % len(destinations)]
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if batch.bound_start is not None:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                client.bind(bound_endpoint(batch.bound_start + index, port_range))
            else:
                client.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                client.bind((sources[(index // len(destinations)) % len(sources)], 0))
            client.connect(destination)
            server, _ = listeners[destination].accept()
        except BaseException:
            client.close()
            raise
        _finish(batch.ending, client, server, held)
    return batch.count


def _open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def helper_main(commands: IO[str], replies: IO[str], port_range: tuple[int, int]) -> int:
    """Serve commands until "exit" or end of input. Sockets live until the process ends."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socket.setdefaulttimeout(10.0)  # no connect, accept or recv can hang the helper
    listeners: dict[tuple[str, int], socket.socket] = {}
    held: list[socket.socket] = []
    for line in commands:
        started = time.monotonic()
        try:
            command = json.loads(line)
            op = command["op"]
            if op == "exit":
                return 0
            if op == "listen":
                for address, port in command["listeners"]:
                    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind((address, port))
                    listener.listen(4096)
                    listeners[(address, int(port))] = listener
                made = len(command["listeners"])
            elif op == "connect":
                batch = ConnectionBatch.from_json(command["batch"])
                made = make_connections(
                    batch, listeners, held, port_range, started + COMMAND_TIMEOUT
                )
            else:
                raise PopulationError(f"unknown op {op!r}")
            reply: dict[str, Any] = {
                "ok": True,
                "made": made,
                "seconds": time.monotonic() - started,
                "fds": _open_count(),
            }
        except Exception as error:
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# The benchmark's side: a pool of helpers driven over pipes.


@dataclass(slots=True)
class HelperPool:
    """Helper processes of one population; every call is bounded in time."""

    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def add(self, process: subprocess.Popen[str]) -> None:
        self.processes.append(process)

    def command_all(
        self, commands: Sequence[Mapping[str, Any] | None], timeout: float
    ) -> list[dict[str, Any] | None]:
        """Send commands[i] to helper i (None: nothing), at once; gather the replies."""
        pending: dict[int, int] = {}  # stdout fd -> helper index
        for index, command in enumerate(commands):
            if command is None:
                continue
            process = self.processes[index]
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()
            pending[process.stdout.fileno()] = index
        replies: list[dict[str, Any] | None] = [None] * len(commands)
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PopulationError(
                    f"helpers {sorted(pending.values())} did not answer within {timeout:.0f} s"
                )
            ready, _, _ = select.select(list(pending), [], [], remaining)
            for fd in ready:
                index = pending.pop(fd)
                stdout = self.processes[index].stdout
                assert stdout is not None
                line = stdout.readline()
                if not line:
                    code = self.processes[index].poll()
                    raise PopulationError(f"helper {index} exited (status {code})")
                reply = json.loads(line)
                if not reply.get("ok"):
                    raise PopulationError(f"helper {index}: {reply.get('error')}")
                replies[index] = reply
        return replies

    def stop(self, grace: float = 2.0, patience: float = 120.0) -> list[int]:
        """Ask every helper to exit, kill what is left, reap all; never raises.

        A helper holding 20,000 sockets can take seconds to die on a busy machine (the kernel
        closes each socket), hence the patience. Returns the pids still alive after it.
        """
        for process in self.processes:
            with contextlib.suppress(OSError, ValueError):
                if process.poll() is None and process.stdin is not None:
                    process.stdin.write('{"op": "exit"}\n')
                    process.stdin.flush()
        deadline = time.monotonic() + grace
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        deadline = time.monotonic() + patience
        stuck = []
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck.append(process.pid)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
        self.processes.clear()
        return stuck


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "helper":
        return helper_main(sys.stdin, sys.stdout, (int(argv[1]), int(argv[2])))
    sys.stderr.write(
        "usage: populations.py helper PORT_LOW PORT_HIGH  (started by bench_poll.py)\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
