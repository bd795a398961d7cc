"""Closed TCP connections, heard on the kernel's socket-destroy multicast (what ``ss -E`` reads),
and the long-lived source ``lifecycle`` that runs one listener per polled namespace.

A ``NETLINK_SOCK_DIAG`` socket bound to the groups ``SKNLGRP_INET_TCP_DESTROY`` (1) and
``SKNLGRP_INET6_TCP_DESTROY`` (3) receives one message per destroyed TCP socket of the network
namespace it was created in (net/core/sock.c ``sk_destruct`` -> net/core/sock_diag.c
``sock_diag_broadcast_destroy``). Binding needs no privilege (sock_diag's netlink kernel socket
has ``NL_CFG_F_NONROOT_RECV``). Parsing and classification: lifecycle_events.py; the bounded
per-peer table: lifecycle_peers.py; what users read: docs/connections.md.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

from tcpwatch.config import CollectSettings
from tcpwatch.model import LifecycleStats, Snapshot
from tcpwatch.sources.base import SourceContext, long_lived_source
from tcpwatch.sources.lifecycle_events import make_context
from tcpwatch.sources.lifecycle_peers import (
    DEFAULT_MAX_PEERS,
    DEFAULT_PEER_IDLE_SECONDS,
    LifecycleAggregator,
    tracked_peers,
)
from tcpwatch.sources.netlink import NETLINK_SOCK_DIAG, SockDiagError
from tcpwatch.sources.recvbatch import SHARED_SLOTS, BatchReceiver, Slots

SKNLGRP_INET_TCP_DESTROY = 1
SKNLGRP_INET6_TCP_DESTROY = 3
DESTROY_GROUPS = (1 << (SKNLGRP_INET_TCP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_TCP_DESTROY - 1))
DEFAULT_RECEIVE_BUFFER = 4 << 20  # bytes asked for; the kernel doubles it (socket(7))
SO_RCVBUFFORCE = 33
SO_MEMINFO = 55  # u32[SK_MEMINFO_VARS]; index 8 is sk_drops (include/uapi/linux/sock_diag.h)
_SK_MEMINFO_DROPS = 8
_MAX_DATAGRAMS_PER_READ = 8192  # read_ready returns after this many; the fd stays readable
_EVENT_TRUESIZE = 1280  # receive-buffer bytes one queued destroy message takes (6.18, measured)
_SHARED_KEY = "recvbatch.Slots"  # the destroy readers' slots in a gathering thread's shared objects


def open_destroy_socket(receive_buffer: int = DEFAULT_RECEIVE_BUFFER) -> socket.socket:
    """A non-blocking socket subscribed to this namespace's TCP destroy events.

    The buffer is set with SO_RCVBUFFORCE when the caller may (CAP_NET_ADMIN), else with
    SO_RCVBUF, which the kernel caps at net.core.rmem_max.
    """
    try:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
            NETLINK_SOCK_DIAG,
        )
    except (OSError, AttributeError) as error:
        raise SockDiagError(f"cannot open a NETLINK_SOCK_DIAG socket: {error}") from error
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, DESTROY_GROUPS))
    except OSError as error:
        sock.close()
        raise SockDiagError(f"cannot subscribe to TCP destroy events: {error}") from error
    return sock


class DestroyListener:
    """One namespace's destroy-event subscription, read between polls and drained by each.

    Create it on a thread that is in the namespace to watch (a socket stays in the namespace it
    was created in). ``read_ready`` runs on the reader thread when ``fileno()`` is readable;
    ``update_context`` and ``drain`` on the poll thread; a lock keeps them apart.

    Lost events: the kernel drops a multicast message when this socket's receive buffer is
    full. ``overruns`` counts the reads (recvmmsg) that failed with ENOBUFS (the kernel reports a
    run of drops once, so each means one or more messages lost); ``lost`` is the exact number
    of dropped messages, the socket's sk_drops read with SO_MEMINFO at each drain.
    """

    def __init__(
        self,
        receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
        max_peers: int = tracked_peers(DEFAULT_MAX_PEERS),
        peer_idle_seconds: float = DEFAULT_PEER_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sock: socket.socket | None = None,
        receiver: BatchReceiver | None = None,
    ) -> None:
        self._sock = sock if sock is not None else open_destroy_socket(receive_buffer)
        self._lock = threading.Lock()
        self._aggregator = LifecycleAggregator(max_peers, peer_idle_seconds, clock)
        self._receiver = receiver or BatchReceiver(self._sock.fileno())
        self._overruns = 0
        self._lost: int | None = None
        self._closed = False
        self.receive_buffer = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def read_delay(self) -> float:
        """Seconds a reader thread may sleep after each ``read_ready`` to read events in batches.

        Waking once per event costs about 9 us per event, reading in batches about 4 us
        (benchmarks/bench_lifecycle.py). The delay is the time 20,000 events/s take to fill a
        quarter of the buffer (each queued event takes about 1,280 bytes of it), at most 20 ms:
        20 ms with the default 8 MiB buffer, about 4 ms with an unprivileged 416 KiB one.
        """
        events = self.receive_buffer / _EVENT_TRUESIZE
        return min(0.02, events / 4 / 20_000)

    def share(self, shared: dict[str, object]) -> None:
        """Receive into the slots every destroy reader of the calling gathering thread shares
        (``shared``: that thread's, gathering.Gathering's), made by the first: a batch of up to
        SHARED_SLOTS datagrams at the memory of one reader. Call before the first read; from
        then on only that thread may call ``read_ready``."""
        slots = shared.get(_SHARED_KEY)
        if not isinstance(slots, Slots):
            slots = shared[_SHARED_KEY] = Slots(SHARED_SLOTS)
        with self._lock:
            self._receiver = BatchReceiver(self._sock.fileno(), shared=slots)

    def read_ready(self) -> None:
        """Read and count every pending datagram, without blocking.

        One recvmmsg per batch of up to 64 datagrams (recvbatch.py; 256 in the slots the
        daemon's readers share, ``share``), counted under one hold of the lock; at most 8,192
        datagrams per call (the fd stays readable if more wait).
        """
        receiver = self._receiver
        for _ in range(_MAX_DATAGRAMS_PER_READ // receiver.slots):
            with self._lock:
                if self._closed:  # its descriptor number may belong to another file now
                    return
                try:
                    lengths = receiver.receive()
                except OSError as error:
                    if error.errno != errno.ENOBUFS:
                        raise SockDiagError(
                            f"reading TCP destroy events failed: {error}"
                        ) from error
                    self._overruns += 1  # the kernel dropped messages since the last read
                    continue
                if lengths:
                    self._aggregator.consume(receiver.buffer, lengths, stride=receiver.slot_size)
            if len(lengths) < receiver.slots:
                return

    def update_context(
        self,
        listen_ports: frozenset[int],
        port_range: tuple[int, int] | None,
        listeners: Iterable[tuple[str, int]] = (),
    ) -> None:
        """The poll's listener ports (and, optionally, (address, port) of each listener, which
        name inbound peers as the listener; without them the local address names it) and
        ip_local_port_range (None: the kernel's default, 32768-60999)."""
        context = make_context(listen_ports, port_range, listeners)
        with self._lock:
            self._aggregator.update_context(context)

    def drain(self) -> LifecycleStats:
        """An immutable snapshot: the listener's cumulative totals, and each tracked peer's counts
        since the previous drain (``activity``; lifecycle_peers.table_of makes a table of it)."""
        with self._lock:
            if not self._closed:
                self._lost = _socket_drops(self._sock)
            return self._aggregator.stats(self._overruns, self._lost, self.receive_buffer)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._lost = _socket_drops(self._sock)
                self._closed = True
                self._sock.close()


def _socket_drops(sock: socket.socket) -> int | None:
    """sk_drops of a socket (SO_MEMINFO, Linux 4.12+), None when the kernel does not say."""
    size = (_SK_MEMINFO_DROPS + 1) * 4
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, size)
    except OSError:
        return None
    if len(raw) < size:
        return None
    value: int = struct.unpack_from("=I", raw, _SK_MEMINFO_DROPS * 4)[0]
    return value


class LifecycleGatherer:
    """The ``lifecycle`` source's gatherer: a DestroyListener told, at each drain, this poll's
    listeners and ip_local_port_range (read before it in the same poll), so events are
    classified by what the namespace looks like now."""

    def __init__(self, listener: DestroyListener) -> None:
        self.listener = listener

    def fileno(self) -> int:
        return self.listener.fileno()

    @property
    def read_delay(self) -> float:
        return self.listener.read_delay

    def share(self, shared: dict[str, object]) -> None:
        self.listener.share(shared)

    def read_ready(self) -> None:
        self.listener.read_ready()

    def drain(self, so_far: Snapshot) -> LifecycleStats:
        sockets, sysctls = so_far.sockets, so_far.sysctls
        if sockets is not None:  # else (the dump failed) the previous poll's context stays
            listeners = sockets.listeners
            self.listener.update_context(
                frozenset(listener.port for listener in listeners),
                sysctls.port_range if sysctls is not None else None,
                [(listener.address, listener.port) for listener in listeners],
            )
        return self.listener.drain()

    def close(self) -> None:
        self.listener.close()


def _enabled(settings: CollectSettings) -> bool:
    return settings.connections


@long_lived_source("lifecycle", field="connections", order=50, enabled=_enabled)
def start_lifecycle(context: SourceContext) -> LifecycleGatherer:
    """Subscribe inside the namespace (the socket hears the namespace it was created in)."""
    settings = context.settings
    return LifecycleGatherer(
        DestroyListener(
            receive_buffer=settings.connection_receive_buffer,
            max_peers=tracked_peers(settings.connection_peers),
            peer_idle_seconds=settings.connection_peer_idle,
        )
    )
