"""Families of the ``counters`` source (/proc/net/netstat and snmp): the listen path's kernel
counters, and the host's TCP counters that docs/connections.md reads beside the closed
connections."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from tcpwatch.render.families.base import family, kernel_counters
from tcpwatch.state import ExportState

# The listen path's kernel counters: nstat name -> exported counter name (without _total), help.
KERNEL_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "TcpExtListenOverflows",
        "tcpwatch_listen_overflows",
        "Connections dropped because a listener's accept queue was full (TcpExtListenOverflows).",
    ),
    (
        "TcpExtListenDrops",
        "tcpwatch_listen_drops",
        "SYNs and final ACKs dropped on the listen path, overflows included (TcpExtListenDrops).",
    ),
    (
        "TcpExtTCPReqQFullDrop",
        "tcpwatch_syn_queue_drops",
        "SYNs dropped because the SYN queue was full and syncookies were off "
        "(TcpExtTCPReqQFullDrop).",
    ),
    (
        "TcpExtTCPReqQFullDoCookies",
        "tcpwatch_syn_queue_cookies",
        "SYNs answered with a syncookie because the SYN queue was full "
        "(TcpExtTCPReqQFullDoCookies).",
    ),
    ("TcpExtSyncookiesSent", "tcpwatch_syncookies_sent", "Syncookies sent (TcpExtSyncookiesSent)."),
    (
        "TcpExtSyncookiesRecv",
        "tcpwatch_syncookies_received",
        "Valid syncookies received back (TcpExtSyncookiesRecv).",
    ),
    (
        "TcpExtSyncookiesFailed",
        "tcpwatch_syncookies_failed",
        "Invalid syncookies received (TcpExtSyncookiesFailed).",
    ),
    (
        "TcpExtTCPTimeWaitOverflow",
        "tcpwatch_timewait_overflows",
        "TIME_WAIT sockets destroyed at once because tcp_max_tw_buckets was reached "
        "(TcpExtTCPTimeWaitOverflow).",
    ),
)

# The connections' kernel counters beside the lifecycle source's per-peer ones (exact even when
# events are lost): nstat name -> exported counter name (without _total), help.
HOST_TCP_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "TcpActiveOpens",
        "tcpwatch_tcp_active_opens",
        "Connections this namespace started: SYN_SENT entered (Tcp ActiveOpens).",
    ),
    (
        "TcpPassiveOpens",
        "tcpwatch_tcp_passive_opens",
        "Connections accepted by listeners: SYN_RECV entered from LISTEN (Tcp PassiveOpens).",
    ),
    (
        "TcpAttemptFails",
        "tcpwatch_tcp_attempt_fails",
        "Connection attempts that failed: SYN_SENT or SYN_RECV to CLOSED, or SYN_RECV back to "
        "LISTEN (Tcp AttemptFails).",
    ),
    (
        "TcpEstabResets",
        "tcpwatch_tcp_established_resets",
        "ESTABLISHED or CLOSE_WAIT connections ended by a reset (Tcp EstabResets).",
    ),
    ("TcpOutRsts", "tcpwatch_tcp_resets_sent", "TCP segments sent with RST (Tcp OutRsts)."),
    (
        "TcpOutSegs",
        "tcpwatch_tcp_segments_sent",
        "TCP segments sent, retransmissions excluded (Tcp OutSegs).",
    ),
    (
        "TcpRetransSegs",
        "tcpwatch_tcp_segments_retransmitted",
        "TCP segments retransmitted (Tcp RetransSegs).",
    ),
    (
        "TcpExtTCPTimeouts",
        "tcpwatch_tcp_retransmission_timeouts",
        "Retransmission timer expiries, SYN timeouts included (TcpExtTCPTimeouts).",
    ),
    (
        "TcpExtTCPSynRetrans",
        "tcpwatch_tcp_syn_retransmits",
        "SYN and SYN-ACK retransmissions (TcpExtTCPSynRetrans).",
    ),
    (
        "TcpExtTCPAbortOnTimeout",
        "tcpwatch_tcp_aborts_on_timeout",
        "Connections aborted after too many retransmissions or keepalive probes "
        "(TcpExtTCPAbortOnTimeout).",
    ),
    (
        "TcpExtTCPAbortOnData",
        "tcpwatch_tcp_aborts_on_data",
        "Connections reset because data arrived after the application closed "
        "(TcpExtTCPAbortOnData).",
    ),
    (
        "TcpExtTCPAbortOnClose",
        "tcpwatch_tcp_aborts_on_close",
        "Connections reset because the application closed with unread data "
        "(TcpExtTCPAbortOnClose).",
    ),
    (
        "TcpExtTCPAbortOnMemory",
        "tcpwatch_tcp_aborts_on_memory",
        "Connections aborted for lack of TCP memory or too many orphans (TcpExtTCPAbortOnMemory).",
    ),
    (
        "TcpExtTCPAbortOnLinger",
        "tcpwatch_tcp_aborts_on_linger",
        "Connections reset in FIN_WAIT2 after tcp_fin_timeout/TCP_LINGER2 "
        "(TcpExtTCPAbortOnLinger).",
    ),
)


# Where the time goes, host-wide (docs/connections.md, "Who is slow"): windows, receive-side
# drops and loss recovery. nstat name -> exported counter name (without _total), help.
SLOWNESS_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "TcpExtTCPWinProbe",
        "tcpwatch_tcp_window_probes_sent",
        "Zero-window probes sent: a peer's receive window was closed while this namespace had "
        "data for it (TcpExtTCPWinProbe).",
    ),
    (
        "TcpExtTCPToZeroWindowAdv",
        "tcpwatch_tcp_to_zero_window_advertised",
        "Times a local socket's advertised receive window went from open to zero: a local "
        "application stopped reading (TcpExtTCPToZeroWindowAdv).",
    ),
    (
        "TcpExtTCPFromZeroWindowAdv",
        "tcpwatch_tcp_from_zero_window_advertised",
        "Times a local socket's advertised receive window reopened after being zero "
        "(TcpExtTCPFromZeroWindowAdv).",
    ),
    (
        "TcpExtTCPWantZeroWindowAdv",
        "tcpwatch_tcp_want_zero_window_advertised",
        "Segments sent while a local socket's receive window was zero, counting each one "
        "while it stays closed (TcpExtTCPWantZeroWindowAdv).",
    ),
    (
        "TcpExtTCPZeroWindowDrop",
        "tcpwatch_tcp_zero_window_drops",
        "Data segments dropped because the local socket's receive window was zero "
        "(TcpExtTCPZeroWindowDrop).",
    ),
    (
        "TcpExtTCPRcvQDrop",
        "tcpwatch_tcp_receive_queue_drops",
        "Data segments dropped because the local socket's receive buffer was full and could not "
        "be pruned (TcpExtTCPRcvQDrop): the application does not read.",
    ),
    (
        "TcpExtTCPBacklogDrop",
        "tcpwatch_tcp_backlog_drops",
        "Segments dropped because a socket's backlog was full while its owner held it "
        "(TcpExtTCPBacklogDrop).",
    ),
    (
        "TcpExtTCPOFODrop",
        "tcpwatch_tcp_out_of_order_drops",
        "Out-of-order segments dropped for lack of receive buffer (TcpExtTCPOFODrop).",
    ),
    (
        "TcpExtRcvPruned",
        "tcpwatch_tcp_receive_pruned",
        "Segments dropped from a receive queue because collapsing it did not make room "
        "(TcpExtRcvPruned).",
    ),
    (
        "TcpExtTCPLossProbes",
        "tcpwatch_tcp_loss_probes",
        "Tail loss probes sent: the last segments of a burst went unacknowledged "
        "(TcpExtTCPLossProbes).",
    ),
    (
        "TcpExtTCPSpuriousRTOs",
        "tcpwatch_tcp_spurious_rtos",
        "Retransmission timeouts found spurious afterwards by F-RTO: the path was slow, not "
        "lossy (TcpExtTCPSpuriousRTOs).",
    ),
)


@family(source="counters", order=40)
def listen_counter_families(state: ExportState) -> Iterator[Metric]:
    yield from kernel_counters(KERNEL_COUNTERS, state)


@family(source="counters", order=51)
def host_tcp_counter_families(state: ExportState) -> Iterator[Metric]:
    yield from kernel_counters(HOST_TCP_COUNTERS, state)


@family(source="counters", order=52)
def slowness_counter_families(state: ExportState) -> Iterator[Metric]:
    yield from kernel_counters(SLOWNESS_COUNTERS, state)
