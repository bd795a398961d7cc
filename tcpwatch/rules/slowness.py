"""W01-W02: who is slow: the receiver (a peer that does not read) or the local application.

They read the live connections of each (direction, peer) (``stalls.live_peers()``: the
listeners' scan and the per-destination scan, docs/connections.md "Who is slow"): each
connection's tcp_info chronographs (time busy sending, and of it time waiting on the peer's
window or on its own send buffer, summed over its life so far), its queues now, its socket
memory and drops; and the namespace's window and drop counters over the window. The peer is
named as the connection metrics name it: a listener for its clients (inbound), a destination
(outbound).

Where the time went is a share of busy time (``ss -ti`` prints the same share per connection:
``busy:4936ms rwnd_limited:4936ms(100.0%)``), judged once the peer's connections were busy for
``minimum_busy_seconds`` in all; on kernels before 4.10 (no chronographs) W01 falls back to
connections whose peer window is closed now.
"""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.model import ProcessRef
from tcpwatch.rules.base import (
    Finding,
    Severity,
    Threshold,
    Thresholds,
    Window,
    required,
    rule,
)
from tcpwatch.rules.fixes import comment, process_label, process_phrase, run_in
from tcpwatch.rules.peers import split_peer
from tcpwatch.rules.shapes import add_counter, add_window
from tcpwatch.rules.shared import (
    WORST_SHOWN,
    add_closed,
    add_times,
    base_evidence,
    busy_share,
    busy_thresholds,
    closed_waits,
    describe,
    peer_owner,
    size_text,
    slow_candidates,
    ss_filter,
)
from tcpwatch.stalls import LivePeer, live_peers

# --- W01 ---------------------------------------------------------------------------------------


def _w01_remediation(window: Window, peer: LivePeer, owner: ProcessRef | None) -> str:
    netns = window.current.netns
    address, port = split_peer(peer.peer)
    who = process_phrase(owner)
    if peer.direction == "inbound":
        lines = [
            comment(
                f"{who} has data for the clients of {peer.peer} and waits on their receive "
                "windows: they read slower than it sends (slow or mobile networks, clients that "
                "stopped reading or read on purpose slowly, a proxy in front buffering little)."
            ),
            "# The server is not the bottleneck, but every stalled connection holds its Send-Q "
            "in memory and a connection slot until the client reads or a timeout ends it.",
            "# which clients, their windows (snd_wnd), Send-Q and the persist timer:",
            run_in(netns, f"ss -tinmo state established {ss_filter(peer)}"),
            "# bound what a stalled client can hold: nginx send_timeout (60 s by default) closes "
            "a connection that accepts nothing for that long; haproxy: timeout client; for large "
            "downloads let the clients resume (Range requests) rather than raise the timeouts",
        ]
    else:
        lines = [
            comment(
                f"{who} sends to {peer.peer} faster than it reads: the application there is slow "
                "to read (overloaded, blocked on something else) or advertises a small window (its "
                "receive buffer is clamped: SO_RCVBUF set by the application, a low tcp_rmem, or "
                "window scaling off on the way)"
            ),
            "# the connections, their peer windows (snd_wnd) and queues:",
            run_in(netns, f"ss -tinmo state established {ss_filter(peer)}"),
            f"# on {address}: ss -tnm 'sport = :{port}' (a full Recv-Q there: its application "
            "does not read; W02 on that host)",
        ]
    lines.append(
        "# verify: tcpwatch_live_rwnd_limited_seconds / tcpwatch_live_busy_seconds of "
        f'peer="{peer.peer}" falls'
    )
    return "\n".join(lines)


@rule(
    "W01",
    "slow-receivers",
    "warning",
    "A peer keeps this host's sends waiting on its receive window: it does not read fast enough",
    thresholds=(
        *busy_thresholds(0.5, "the peer's receive window"),
        Threshold(
            "zero_window_connections",
            2,
            1,
            1e9,
            "connections",
            "connections waiting on a closed peer window now that report it when the kernel "
            "has no chronographs (before 4.10)",
        ),
    ),
)
def W01(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    limit = required(thresholds, "warning")
    minimum_busy = required(thresholds, "minimum_busy_seconds")
    stalled_minimum = required(thresholds, "zero_window_connections")
    snapshot = window.current
    for peer, gone in slow_candidates(window):
        stalls = peer.stalls
        share = busy_share(stalls, stalls.rwnd_limited_seconds, minimum_busy)
        if stalls.busy_seconds is not None:
            live = share is not None and share >= limit
        else:
            live = stalls.zero_window >= stalled_minimum
        waits = closed_waits(gone, minimum_busy)
        closed_share = waits.rwnd_limited_us / waits.busy_us if waits is not None else None
        if not live and (closed_share is None or closed_share < limit):
            continue
        owner = peer_owner(snapshot, peer)
        evidence = base_evidence(window, peer, owner)
        if share is not None:
            evidence["rwnd_limited_share"] = round(share, 4)
        add_times(evidence, stalls)
        evidence["rwnd_limited_connections"] = stalls.rwnd_limited_connections
        evidence["zero_window_connections"] = stalls.zero_window
        evidence["send_queue_bytes"] = stalls.send_queue_bytes
        if closed_share is not None:
            evidence["closed_rwnd_limited_share"] = round(closed_share, 4)
        add_closed(evidence, gone)
        inbound = peer.direction == "inbound"
        waiting = [c for c in stalls.worst if c.rwnd_limited_seconds or c.zero_window]
        if waiting:
            shown = ", ".join(describe(c, inbound) for c in waiting[:WORST_SHOWN])
            evidence["worst_peers" if inbound else "worst_connections"] = shown
            windows = [c.peer_window for c in waiting if c.peer_window]
            if windows:
                evidence["peer_window_max_bytes"] = max(windows)
        if not live and gone is not None and closed_share is not None:
            # only the connections that closed in the window show it
            how_much = f"{closed_share:.0%} of the sending time of connections that closed"
            now = f"{gone.waits.zero_window_closes} of {gone.attempts} closed on a zero window"
        else:
            how_much = f"{share:.0%} of their sending time" if share is not None else "now"
            now = f"{stalls.zero_window} of {stalls.connections} connections stalled now"
        if inbound:
            title = (
                f"{process_label(owner)} waits on its clients' windows at {peer.peer}: "
                f"{how_much}, {now}"
            )
        else:
            title = (
                f"{peer.peer} reads slower than {process_label(owner)} sends: {how_much} "
                f"waiting on its window, {now}"
            )
        severity: Severity = "info" if inbound else "warning"  # clients' pace is not a fault here
        yield W01.finding(
            window,
            title,
            evidence,
            _w01_remediation(window, peer, owner),
            subject=peer.peer,
            severity=severity,
        )


# --- W02 ---------------------------------------------------------------------------------------

_DROP_COUNTERS = ("TcpExtTCPRcvQDrop", "TcpExtTCPZeroWindowDrop")


def _w02_remediation(window: Window, peer: LivePeer | None, owner: ProcessRef | None) -> str:
    netns = window.current.netns
    who = process_phrase(owner)
    lines = [
        comment(
            f"{who} does not read what arrives fast enough: data piles up in its sockets' receive "
            "queues, their windows close and the senders wait (or the kernel drops data once the "
            "buffer is full). The network and the peers are not the bottleneck: this process is."
        ),
    ]
    if peer is not None:
        lines.append(run_in(netns, f"ss -tnmp state established {ss_filter(peer)}"))
    else:
        lines.append(run_in(netns, "ss -tnmp state established | awk '$2 > 0'"))
    pid = owner.pid if owner is not None else None
    lines += [
        "# what it is doing instead of reading (blocked on a lock, a disk, a downstream call, "
        "CPU starved, a full worker pool):",
        f"top -H -p {pid}" if pid else "# top -H -p <pid of the process above>",
        f"cat /proc/{pid}/wchan; echo" if pid else "# cat /proc/<pid>/wchan",
        "# the namespace's own counts, growing while this lasts:",
        run_in(
            netns, "nstat -az TcpExtTCPRcvQDrop TcpExtTCPZeroWindowDrop TcpExtTCPToZeroWindowAdv"
        ),
        "# a larger receive buffer only delays the stall; the fix is in the application "
        "(more readers, no blocking work on the reading path)",
    ]
    return "\n".join(lines)


@rule(
    "W02",
    "application-not-reading",
    "warning",
    "A local application does not read what arrives: receive queues fill and the kernel drops",
    thresholds=(
        Threshold(
            "minimum_connections",
            1,
            1,
            1e9,
            "connections",
            "connections of one peer holding unread data with half or more of their receive "
            "buffer used",
        ),
        Threshold(
            "minimum_drops",
            1,
            1,
            1e12,
            "segments",
            "segments the namespace dropped for full receive buffers or closed windows "
            "(TcpExtTCPRcvQDrop + TcpExtTCPZeroWindowDrop) in the window: critical",
        ),
    ),
    counters=_DROP_COUNTERS,
)
def W02(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    minimum = required(thresholds, "minimum_connections")
    minimum_drops = required(thresholds, "minimum_drops")
    snapshot = window.current
    deltas = [window.counter_delta(name) for name in _DROP_COUNTERS]
    dropped = sum(d for d in deltas if d is not None)
    severity: Severity = "critical" if dropped >= minimum_drops else "warning"
    found = False
    for peer in live_peers(snapshot.sockets, snapshot.inbound):
        stalls = peer.stalls
        if stalls.receive_full < minimum:
            continue
        found = True
        owner = peer_owner(snapshot, peer)
        evidence = base_evidence(window, peer, owner)
        evidence["receive_full_connections"] = stalls.receive_full
        evidence["receive_queue_bytes"] = stalls.receive_queue_bytes
        evidence["receive_queue_max_bytes"] = stalls.receive_queue_max_bytes
        if stalls.drops is not None:
            evidence["socket_drops"] = stalls.drops
        full = [c for c in stalls.worst if c.receive_queue]
        if full:
            inbound = peer.direction == "inbound"
            evidence["worst_connections"] = ", ".join(
                f"{c.remote if inbound else c.local} (Recv-Q {size_text(c.receive_queue)} of a "
                f"{size_text(c.receive_buffer or 0)} buffer)"
                for c in full[:WORST_SHOWN]
            )
        for name in _DROP_COUNTERS:
            add_counter(evidence, window, name, total=False)
        add_window(evidence, window)
        where = "its clients of" if peer.direction == "inbound" else "its connections to"
        yield W02.finding(
            window,
            f"{process_label(owner)} does not read {where} {peer.peer}: "
            f"{stalls.receive_full} of {stalls.connections} connections with a full receive "
            f"queue ({size_text(stalls.receive_queue_bytes)} unread)",
            evidence,
            _w02_remediation(window, peer, owner),
            subject=peer.peer,
            severity=severity,
        )
    if not found and dropped >= minimum_drops:
        # Drops without a full buffer at the scan: a burst between scans, or a connection the
        # scans do not cover (an inbound one beyond collect.inbound_connections).
        evidence = {}
        for name in _DROP_COUNTERS:
            add_counter(evidence, window, name, total=False)
        add_window(evidence, window)
        yield W02.finding(
            window,
            f"{dropped} segments dropped for full receive buffers or closed windows in "
            f"{window.seconds or 0:.0f} s: a local application does not read",
            evidence,
            _w02_remediation(window, None, None),
            severity=severity,
        )
