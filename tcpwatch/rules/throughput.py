"""W03-W04: who is slow: this host's send buffer, or the network (the rest of "who is slow",
with slowness.py: the same live peers, docs/connections.md "Who is slow").

A sender that waits on its own send buffer is limited by SO_SNDBUF or tcp_wmem (W03); one that
retransmits while the receiver's window and its buffer have room is limited by the path (W04).
"""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.model import ProcessRef
from tcpwatch.rules.base import (
    EvidenceValue,
    Finding,
    Threshold,
    Thresholds,
    Window,
    required,
    rule,
)
from tcpwatch.rules.fixes import comment, process_label, process_phrase, run_in, sysctl_fix
from tcpwatch.rules.peers import PeerWindow, peer_windows, split_peer
from tcpwatch.rules.shapes import add_window
from tcpwatch.rules.shared import (
    add_closed,
    add_times,
    base_evidence,
    busy_share,
    busy_thresholds,
    closed_waits,
    peer_owner,
    size_text,
    slow_candidates,
    ss_filter,
)
from tcpwatch.stalls import ClosedWaits, LiveConnection, Stalls, live_peers

MAX_WMEM = 64 << 20  # the largest tcp_wmem maximum W03 proposes (bytes)


# --- W03 ---------------------------------------------------------------------------------------


def _w03_fix(
    window: Window, owner: ProcessRef | None, connection: LiveConnection | None
) -> tuple[list[str], dict[str, EvidenceValue]]:
    """The fix lines and the facts they rest on: which buffer, its ceiling, the sysctl."""
    snapshot = window.current
    netns = snapshot.netns
    facts: dict[str, EvidenceValue] = {}
    sysctls = snapshot.sysctls
    wmem_max = sysctls.get("net.ipv4.tcp_wmem", 2) if sysctls is not None else None
    if wmem_max is not None:
        facts["tcp_wmem_max"] = wmem_max
    buffer = connection.send_buffer if connection is not None else None
    lines: list[str] = []
    if connection is not None and buffer:
        facts["send_buffer_bytes"] = buffer
        rtt = connection.min_rtt_seconds or connection.rtt_seconds
        if rtt > 0:
            facts["rtt_seconds"] = round(rtt, 6)
            # In flight at most about half the buffer (the rest is overhead and unsent data).
            ceiling = buffer / 2 / rtt
            facts["throughput_ceiling_bytes_per_second"] = round(ceiling)
            lines.append(
                f"# with a {size_text(buffer)} send buffer and an RTT of {rtt * 1000:.1f} ms, one "
                f"connection moves at most about {size_text(ceiling)}/s: the buffer must hold the "
                "bandwidth x RTT the path allows (x2 for the kernel's overhead)"
            )
    autotuned = buffer is None or buffer >= (wmem_max or 0)  # unknown: the connections are gone
    if sysctls is not None and wmem_max is not None and autotuned:
        target = min(max(wmem_max * 2, 16 << 20), MAX_WMEM)
        if buffer is None:
            lines.append(
                comment(
                    "the connections closed before a scan read their buffers: if "
                    f"{process_phrase(owner)} sets SO_SNDBUF, remove that setsockopt; otherwise "
                    "autotuning reached net.ipv4.tcp_wmem's maximum; raise it:"
                )
            )
        else:
            lines.append("# the kernel's autotuning reached net.ipv4.tcp_wmem's maximum; raise it:")
        low, default = sysctls.get("net.ipv4.tcp_wmem", 0), sysctls.get("net.ipv4.tcp_wmem", 1)
        lines.append(
            sysctl_fix(
                netns, "net.ipv4.tcp_wmem", f"{low} {default} {target}", window.persisted_sysctls
            )
        )
    else:
        who = process_phrase(owner)
        lines.append(
            comment(
                f"the buffer is below tcp_wmem's maximum: {who} most likely sets SO_SNDBUF "
                "itself, which turns the kernel's autotuning off for the socket; remove that "
                "setsockopt (or size it to bandwidth x RTT x 2). SO_SNDBUF is capped at "
                "net.core.wmem_max (sysctl net.core.wmem_max) and doubled by the kernel."
            )
        )
    return lines, facts


@rule(
    "W03",
    "send-buffer-limited",
    "warning",
    "Connections wait on their own send buffer: SO_SNDBUF or tcp_wmem too small for the path",
    thresholds=busy_thresholds(0.2, "its own send buffer"),
    sysctls=("net.ipv4.tcp_wmem",),
)
def W03(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    limit = required(thresholds, "warning")
    minimum_busy = required(thresholds, "minimum_busy_seconds")
    snapshot = window.current
    for peer, gone in slow_candidates(window):
        stalls = peer.stalls
        share = busy_share(stalls, stalls.sndbuf_limited_seconds, minimum_busy)
        waits = closed_waits(gone, minimum_busy)
        closed_share = waits.sndbuf_limited_us / waits.busy_us if waits is not None else None
        live = share is not None and share >= limit
        if not live and (closed_share is None or closed_share < limit):
            continue
        owner = peer_owner(snapshot, peer)
        evidence = base_evidence(window, peer, owner)
        if share is not None:
            evidence["sndbuf_limited_share"] = round(share, 4)
        add_times(evidence, stalls)
        evidence["sndbuf_limited_connections"] = stalls.sndbuf_limited_connections
        if closed_share is not None:
            evidence["closed_sndbuf_limited_share"] = round(closed_share, 4)
        add_closed(evidence, gone)
        limited = [c for c in stalls.worst if c.sndbuf_limited_seconds]
        worst = max(limited, key=lambda c: c.sndbuf_limited_seconds or 0.0, default=None)
        fix, facts = _w03_fix(window, owner, worst)
        evidence.update(facts)
        if worst is not None:
            evidence["worst_connection"] = f"{worst.local} -> {worst.remote}"
        netns = snapshot.netns
        lines = [
            comment(
                f"{process_phrase(owner)} has more to send to {peer.peer} than its socket send "
                "buffer holds: the sender waits on its own buffer, not on the peer or the network"
            ),
            "# the buffer (skmem tb), Send-Q and sndbuf_limited per connection:",
            run_in(netns, f"ss -tinm {ss_filter(peer)}"),
            *fix,
            "# verify: tcpwatch_live_sndbuf_limited_seconds / tcpwatch_live_busy_seconds of "
            f'peer="{peer.peer}" falls for new connections',
        ]
        how_much = (
            f"{share:.0%} of its sending time"
            if live and share is not None
            else f"{closed_share or 0.0:.0%} of the sending time of connections that closed"
        )
        yield W03.finding(
            window,
            f"{process_label(owner)} waits on its send buffer towards {peer.peer}: {how_much}",
            evidence,
            "\n".join(lines),
            subject=peer.peer,
        )


# --- W04 ---------------------------------------------------------------------------------------


def _limited_shares(stalls: Stalls, gone: PeerWindow | None) -> tuple[float | None, float | None]:
    """The receiver's and the send buffer's shares of the busy time of a peer's live
    connections and of those that closed in the window together (None: no chronographs)."""
    waits = gone.waits if gone is not None else ClosedWaits()
    busy = (stalls.busy_seconds or 0.0) + waits.busy_us / 1e6
    if not busy:
        return None, None
    rwnd = (stalls.rwnd_limited_seconds or 0.0) + waits.rwnd_limited_us / 1e6
    sndbuf = (stalls.sndbuf_limited_seconds or 0.0) + waits.sndbuf_limited_us / 1e6
    return rwnd / busy, sndbuf / busy


@rule(
    "W04",
    "network-limited",
    "warning",
    "Connections to a peer lose packets while windows and buffers are open: the network is slow",
    thresholds=(
        Threshold(
            "minimum_segments",
            500,
            1,
            1e12,
            "segments",
            "segments the peer's connections sent (live ones over their lives, closed ones in "
            "the window) before the ratio is judged",
        ),
        Threshold(
            "warning",
            0.02,
            0.001,
            1.0,
            "ratio",
            "segments retransmitted, less those the peer reported as duplicates (spurious), "
            "/ segments sent to report it",
        ),
        Threshold(
            "limited_below",
            0.5,
            0.01,
            1.0,
            "ratio",
            "the receiver's and the send buffer's shares of busy time must each stay below "
            "this: otherwise W01 or W03 names the cause",
        ),
    ),
)
def W04(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    minimum = required(thresholds, "minimum_segments")
    limit = required(thresholds, "warning")
    open_below = required(thresholds, "limited_below")
    snapshot = window.current
    closed = {
        (item.direction, item.peer): item
        for direction in ("inbound", "outbound")
        for item in peer_windows(window, direction)
    }
    netns = snapshot.netns
    for peer in live_peers(snapshot.sockets, snapshot.inbound):
        stalls = peer.stalls
        gone = closed.get((peer.direction, peer.peer))
        rwnd, sndbuf = _limited_shares(stalls, gone)
        if (rwnd or 0.0) >= open_below or (sndbuf or 0.0) >= open_below:
            continue  # the receiver or the buffer held it back: W01 / W03
        sent, retransmitted = stalls.segments_sent, stalls.segments_retransmitted
        # A retransmission the peer reported as a duplicate (D-SACK) repaired no loss: the
        # original had arrived (reordering, an early RTO or probe). Judged without them; the
        # closed connections' are not known (their destroy events are not summed for it).
        spurious = stalls.segments_spurious
        needed = stalls.segments_retransmitted_not_spurious
        if gone is not None and gone.closed["ok"]:
            sent += gone.segments_sent
            retransmitted += gone.segments_retransmitted
            needed += gone.segments_retransmitted
        if sent < minimum or needed / sent < limit:
            continue
        ratio = needed / sent
        owner = peer_owner(snapshot, peer)
        evidence = base_evidence(window, peer, owner)
        evidence["retransmission_ratio"] = round(ratio, 4)
        evidence["segments_sent"] = sent
        evidence["segments_retransmitted"] = retransmitted
        if spurious is not None:
            evidence["spurious_retransmissions"] = spurious
        evidence["retransmits_in_flight"] = stalls.retransmits_in_flight
        if stalls.rto_recoveries is not None:
            evidence["rto_recoveries"] = stalls.rto_recoveries
        if stalls.rto_seconds is not None:
            evidence["rto_seconds"] = round(stalls.rto_seconds, 3)
        if rwnd is not None:
            evidence["rwnd_limited_share"] = round(rwnd, 4)
        if sndbuf is not None:
            evidence["sndbuf_limited_share"] = round(sndbuf, 4)
        if gone is not None:
            evidence["connections_closed"] = gone.attempts
        add_window(evidence, window)
        address, port = split_peer(peer.peer)
        joined = "C02" if peer.direction == "outbound" else "C03"
        lines = [
            f"# {ratio:.1%} of the segments exchanged with {peer.peer} were sent again while "
            "the receiver's window and the send buffer had room, not counting the "
            "retransmissions the peer reported as duplicates: the path loses packets "
            "(congestion, a faulty link, a policer, a path-MTU blackhole). Neither end's "
            f"application is the bottleneck. See {joined} for the closed connections.",
            run_in(netns, f"ss -tinm {ss_filter(peer)}"),
            run_in(
                netns,
                "nstat -az TcpRetransSegs TcpExtTCPTimeouts TcpExtTCPLossProbes "
                "TcpExtTCPSpuriousRTOs TcpExtTCPDSACKRecvSegs",
            ),
        ]
        if peer.direction == "outbound":
            lines.append(run_in(netns, f"mtr -rwzbc 100 --tcp -P {port} {address}"))
        yield W04.finding(
            window,
            f"{peer.peer}: {ratio:.1%} of segments retransmitted with windows and buffers "
            "open: the network is the bottleneck",
            evidence,
            "\n".join(lines),
            subject=peer.peer,
        )
