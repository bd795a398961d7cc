"""Attribution and tallies: each tracepoint record to its namespace and process, or counted.

Tracepoints are global: a record says which socket (its kernel address, ``skaddr``) and which
4-tuple, never which network namespace. The tracker attributes a record only where the kernel
says enough, and counts every other record by event and why (``unattributed``):

1. **The acting task.** A record written outside interrupt context names the task that acted
   (``connect()`` moves a socket from CLOSE to SYN_SENT; ``listen()`` to LISTEN; ``close()``
   sends an abortive reset): its namespace and process are the socket's (tracepoints_tasks.py).
2. **The socket's address.** A socket learned that way is followed by ``skaddr`` until it
   reaches CLOSE (whose record is read too, so a freed address is never taken for its next
   owner): its handshake's end, its SYN retransmissions, resets it sends or receives and
   packets dropped at it (``rx_sk``) are its namespace's, whatever context they come from.
3. **The error a failed connect reports** has no ``skaddr``: it is joined to the SYN_SENT ->
   CLOSE record of the same 4-tuple just before it (``tcp_done_with_error`` writes the two
   back to back), which carries the socket. So a refused connect keeps its destination port
   even when the client then closes abortively and the kernel clears it.
4. **A reset sent for no socket** (NO_SOCKET, in softirq) to a loopback client is joined to the
   reset that client's socket then receives (the same 4-tuple, reversed): loopback traffic never
   leaves its namespace. One sent from an address of tcpwatch's own namespace (its interfaces,
   loopback and link-local left out) is that namespace's: the address a remote client reached.
   Other such resets are counted unattributed.

Tallies are kept per namespace inode (tracepoints_tally.py) and drained into TracepointStats by
:meth:`Tracker.stats`; which keys get rows is the pipeline's host-wide budget's decision.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from tcpwatch.endpoints import endpoint
from tcpwatch.sources.lifecycle_events import (
    Context,
    address_of,
    inbound_peer,
    outbound_peer,
)
from tcpwatch.sources.tracepoints_events import AF_INET, TcpStates
from tcpwatch.sources.tracepoints_tally import BOUNDS_NS, Tally, empty
from tcpwatch.sources.tracepoints_tasks import TaskResolver
from tcpwatch.tracepoint_stats import ABANDONED, FailedConnect, TracepointHost, TracepointStats

SOCKET_LIMIT = 1 << 18  # sockets followed at once (about 200 bytes each)
PENDING_LIMIT = 4096  # closes waiting for their error report, resets waiting for their join
CLOSE_WAIT_NS = 100_000_000  # a failed connect's close waits this long for its error report
RESET_WAIT_NS = 1_000_000_000  # a NO_SOCKET reset waits this long for the one it answers
LABEL_LIMIT = 4096  # destinations' names kept (then forgotten all at once and made again)
CLIENT, CONNECTED, LISTENER = 0, 1, 2
_LOOPBACK4 = 127
_LOOPBACK6 = bytes(15) + b"\x01"


def error_name(number: int) -> str:
    """ECONNREFUSED for 111 (the kernel reports errno values, positive)."""
    return errno.errorcode.get(abs(number), f"errno {abs(number)}")


# A followed socket is a list, made at every connect (a list is about 40 ns to make, a slots
# object with an __init__ about 200): [netns inode, role, (label, process), the sample time
# (ns) it entered SYN_SENT, SYN retransmissions]. The label is the destination of a client,
# the endpoint of a listener; the key is its connects row's (Tally.connect_row).
_Socket = list[Any]
NETNS, ROLE, KEY, STARTED, RETRANSMITS = range(5)


def _is_loopback(family: int, address: bytes) -> bool:
    if family == AF_INET:
        return address[0] == _LOOPBACK4
    return address == _LOOPBACK6 or (address[:12] == bytes(10) + b"\xff\xff" and address[12] == 127)


class Tracker:
    """Every record in, per-namespace tallies out. Not thread-safe: the caller holds a lock."""

    def __init__(
        self,
        tasks: TaskResolver,
        states: TcpStates,
        drop_reasons: Mapping[int, str] | None = None,
        reset_reasons: Mapping[int, str] | None = None,
        socket_limit: int = SOCKET_LIMIT,
    ) -> None:
        self.tasks = tasks
        self.states = states
        self.drop_reasons = dict(drop_reasons or {})
        self.reset_reasons = dict(reset_reasons or {})
        self.socket_limit = socket_limit
        self.sockets: dict[int, _Socket] = {}
        self.tallies: dict[int, Tally] = {}
        # (family, source, sport, destination, dport) of a failed connect's close -> its socket
        self._closing: dict[tuple[int, bytes, int, bytes, int], tuple[_Socket, int]] = {}
        # a NO_SOCKET reset's (family, source, sport, destination, dport) -> (reason, time)
        self._resets: dict[tuple[int, bytes, int, bytes, int], tuple[str, int]] = {}
        self.wanted: frozenset[int] | None = None  # polled namespaces; None: not told yet
        # tcpwatch's own namespace and its addresses (a reset for no socket sent from one is
        # that namespace's); set at each poll
        self.own: tuple[int, frozenset[bytes]] = (0, frozenset())
        self.unattributed: dict[tuple[str, str], int] = {}
        self.other_netns = 0
        self._labels: dict[tuple[int, bytes, int], str] = {}  # (family, address, port) -> name

    # -- what attributes a record ----------------------------------------------------------------

    def _missed(self, event: str, why: str) -> None:
        key = (event, why)
        self.unattributed[key] = self.unattributed.get(key, 0) + 1

    def _tally(self, netns: int) -> Tally | None:
        wanted = self.wanted
        if wanted is not None and netns not in wanted:
            self.other_netns += 1
            return None
        tally = self.tallies.get(netns)
        if tally is None:
            tally = self.tallies[netns] = Tally()
        return tally

    def _actor(self, event: str, pid: int, tid: int, in_task: bool) -> int | None:
        """The namespace of the task that wrote the record, when it acted; else counted."""
        if not in_task:
            self._missed(event, "interrupt")
            return None
        who = self.tasks.resolve(pid, tid)
        if who is None:
            self._missed(event, "task_exited")
            return None
        return who[0]

    # -- records ---------------------------------------------------------------------------------

    def set_state(
        self, pid: int, tid: int, time_ns: int, in_task: bool,
        sk: int, old: int, new: int, family: int, sport: int, dport: int,
        source: bytes, destination: bytes,
    ) -> None:  # fmt: skip
        states = self.states
        if new == states.syn_sent:  # connect(): written by the connecting task
            self.connecting(pid, tid, time_ns, in_task, sk, family, dport, destination)
            return
        if old == states.syn_sent:
            if new == states.established:
                self.established(sk, time_ns)
                return
            entry = self.sockets.get(sk)
            if entry is None or entry[ROLE] != CLIENT:
                self._missed("set_state", "connect_unseen")  # began before the reader
                return
            del self.sockets[sk]
            key = (family, source, sport, destination, dport)
            if len(self._closing) < PENDING_LIMIT:
                self._closing.setdefault(key, (entry, time_ns))
            else:
                self._failed(entry, ABANDONED, key)
            return
        if new == states.listen:
            netns = self._actor("set_state", pid, tid, in_task)
            if netns is not None and len(self.sockets) < self.socket_limit:
                label = endpoint(address_of(family, source), sport)
                self.sockets[sk] = [netns, LISTENER, (label, ""), time_ns, 0]
            return
        if sk in self.sockets:  # into CLOSE: the address may be reused from now on
            del self.sockets[sk]

    def connecting(
        self, pid: int, tid: int, time_ns: int, in_task: bool,
        sk: int, family: int, dport: int, destination: bytes,
    ) -> None:  # fmt: skip
        """CLOSE -> SYN_SENT, a connect's start (set_state's case, without the source address
        it does not use: the readers call it directly; RecordReader.handle_spans has its
        common case inline, and tests/unit/test_tracepoints_batch.py holds the two equal)."""
        if not in_task:
            self._missed("set_state", "interrupt")
            return
        who = self.tasks.resolve(pid, tid)
        if who is None:
            self._missed("set_state", "task_exited")
            return
        if len(self.sockets) >= self.socket_limit:
            self._missed("set_state", "table_full")
            return
        label = self.label(family, destination, dport)
        self.sockets[sk] = [who[0], CLIENT, (label, who[1]), time_ns, 0]

    def label(self, family: int, destination: bytes, port: int) -> str:
        """A connect's destination as its connects row names it, made once a destination."""
        named = (family, destination, port)
        label = self._labels.get(named)
        if label is None:
            if len(self._labels) >= LABEL_LIMIT:
                self._labels.clear()
            label = self._labels[named] = endpoint(address_of(family, destination), port)
        return label

    def established(self, sk: int, time_ns: int) -> None:
        """SYN_SENT -> ESTABLISHED, a connect's end (set_state's case, without the 4-tuple it
        does not use: the readers call it directly; RecordReader.handle_spans has its common
        case inline, and tests/unit/test_tracepoints_batch.py holds the two equal)."""
        entry = self.sockets.get(sk)
        if entry is None or entry[ROLE] != CLIENT:
            self._missed("set_state", "connect_unseen")  # began before the reader
            return
        entry[ROLE] = CONNECTED
        # _tally's and connect_row's work, their common case inline: a namespace with a tally
        # is a polled one (update_contexts drops the others), a known key has its row.
        netns = entry[NETNS]
        tally = self.tallies.get(netns)
        if tally is None:
            tally = self._tally(netns)
            if tally is None:
                return
        key = entry[KEY]
        row = tally.connects.get(key)
        if row is None:
            row = tally.connect_row(*key)
        elapsed_ns = time_ns - entry[STARTED]
        row.buckets[bisect.bisect_left(BOUNDS_NS, elapsed_ns)] += 1
        row.count += 1
        row.sum_ns += elapsed_ns
        if entry[RETRANSMITS]:
            row.syn_retransmits += entry[RETRANSMITS]
            row.retransmitted += 1

    def ended(self, sk: int) -> None:
        """A socket reached CLOSE from a state other than SYN_SENT (the common record, read
        without its 4-tuple): its address may be another socket's from now on."""
        entry = self.sockets.pop(sk, None)
        if entry is not None and entry[ROLE] == CLIENT:
            self.end_unseen()

    def end_unseen(self) -> None:
        """A followed client closing from a state past SYN_SENT: it left SYN_SENT, and the
        record of that (its connect's end) never arrived. Seen on 6.18 with the kernel's lost
        count at 0 (docs/tracepoints.md, "What is not attributed"): counted, not guessed."""
        self._missed("set_state", "connect_end_unseen")

    def _failed(self, entry: _Socket, error: str, key: tuple[int, bytes, int, bytes, int]) -> None:
        """A failed connect, and what a destroy event that lost its port needs to find it:
        the local port and the address (its 4-tuple when it failed)."""
        tally = self._tally(entry[NETNS])
        if tally is None:
            return
        label, process = entry[KEY]
        row = tally.connect_row(label, process)
        row.failures[error] = row.failures.get(error, 0) + 1
        row.syn_retransmits += entry[RETRANSMITS]
        family, _, sport, destination, _ = key
        if sport:
            address = address_of(family, destination)
            tally.failed_connect(FailedConnect(family, sport, address, label, error))

    def error_report(
        self, error: int, family: int, sport: int, dport: int, source: bytes, destination: bytes
    ) -> None:
        """The error of a failed connect (the close before it has the socket); others pass."""
        key = (family, source, sport, destination, dport)
        waiting = self._closing.pop(key, None)
        if waiting is not None:
            self._failed(waiting[0], error_name(error), key)

    def retransmit(self, sk: int) -> None:
        entry = self.sockets.get(sk)
        if entry is None or entry[ROLE] != CLIENT:
            self._missed("retransmit", "unknown_socket")
            return
        entry[RETRANSMITS] += 1

    def send_reset(
        self, pid: int, tid: int, time_ns: int, in_task: bool,
        sk: int, reason: int, family: int, sport: int, dport: int,
        source: bytes, destination: bytes,
    ) -> None:  # fmt: skip
        name = self.reset_reasons.get(reason, "" if reason < 0 else f"reason {reason}")
        entry = self.sockets.get(sk) if sk else None
        if entry is not None:
            tally = self._tally(entry[NETNS])
            if tally is not None:
                tally.reset("sent", entry[KEY][0], name)
            return
        if not sk and not in_task:
            waiting = self._resets
            if _is_loopback(family, source):
                if len(waiting) < PENDING_LIMIT:
                    waiting[(family, source, sport, destination, dport)] = (name, time_ns)
                    return  # joined by the reset its client receives
            elif source in self.own[1]:  # a client elsewhere reached an address of ours
                tally = self._tally(self.own[0])
                if tally is not None:
                    tally.reset("sent", inbound_peer(family, source, sport, tally.context), name)
                return
        netns = self._actor("send_reset", pid, tid, in_task)
        if netns is None:
            return
        tally = self._tally(netns)
        if tally is not None:
            peer = self._peer(tally, family, source, sport, destination, dport, bool(sk))
            tally.reset("sent", peer, name)

    def receive_reset(
        self, pid: int, tid: int, in_task: bool,
        sk: int, family: int, sport: int, dport: int, source: bytes, destination: bytes,
    ) -> None:  # fmt: skip
        answered = self._resets.pop((family, destination, dport, source, sport), None)
        entry = self.sockets.get(sk)
        if entry is not None:
            netns, peer = entry[NETNS], entry[KEY][0]
        else:
            found = self._actor("receive_reset", pid, tid, in_task)
            if found is None:
                if answered is not None:
                    self._missed("send_reset", "no_socket")
                return
            netns = found
            peer = ""
        tally = self._tally(netns)
        if tally is None:
            return
        if not peer:
            peer = self._peer(tally, family, source, sport, destination, dport, True)
        tally.reset("received", peer, "")
        if answered is not None:  # the NO_SOCKET reset this host sent it, on loopback
            tally.reset("sent", endpoint(address_of(family, destination), dport), answered[0])

    def drop(self, pid: int, tid: int, in_task: bool, rx_sk: int, reason: int) -> None:
        name = self.drop_reasons.get(reason, f"reason {reason}")
        entry = self.sockets.get(rx_sk) if rx_sk else None
        if entry is not None:
            netns = entry[NETNS]
            listener = entry[KEY][0] if entry[ROLE] == LISTENER else ""
        else:
            if rx_sk and not in_task:
                self._missed("drop", "unknown_socket")
                return
            found = self._actor("drop", pid, tid, in_task)
            if found is None:
                return
            netns, listener = found, ""
        tally = self._tally(netns)
        if tally is not None:
            tally.drop(name, listener)

    def _peer(
        self, tally: Tally, family: int, source: bytes, sport: int,
        destination: bytes, dport: int, has_socket: bool,
    ) -> str:  # fmt: skip
        """The service side of a 4-tuple: the local port a client reached (a reset for no
        socket, an inbound connection), else the destination connected to."""
        context = tally.context
        low, high = context.port_range
        if not has_socket or sport in context.listen_ports or not low <= sport <= high:
            return inbound_peer(family, source, sport, context)
        return outbound_peer(family, destination, dport)

    # -- time and polls --------------------------------------------------------------------------

    def expire(self, now_ns: int) -> None:
        """Give up waiting: a close without an error report was the client's own (abandoned);
        a NO_SOCKET reset nobody here received is counted unattributed."""
        if self._closing:
            for key, (entry, at) in list(self._closing.items()):
                if now_ns - at >= CLOSE_WAIT_NS:
                    del self._closing[key]
                    self._failed(entry, ABANDONED, key)
        if self._resets:
            for key, (_, at) in list(self._resets.items()):
                if now_ns - at >= RESET_WAIT_NS:
                    del self._resets[key]
                    self._missed("send_reset", "no_socket")

    def update_contexts(self, contexts: Mapping[int, Context], wanted: Collection[int]) -> None:
        """The polled namespaces (inode -> listeners and port range); others are not tallied."""
        self.wanted = frozenset(wanted)
        for inode in list(self.tallies):
            if inode not in self.wanted:
                del self.tallies[inode]
        for inode, context in contexts.items():
            tally = self._tally(inode)
            if tally is not None:
                tally.context = context

    def stats(self, inodes: Iterable[int], host: TracepointHost) -> dict[int, TracepointStats]:
        """Each namespace's counts since the previous call (the tallies start afresh)."""
        shares: dict[int, TracepointStats] = {}
        for inode in inodes:
            tally = self.tallies.get(inode)
            shares[inode] = tally.drained(host) if tally is not None else empty(host)
        return shares
