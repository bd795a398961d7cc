"""Attribution of tracepoint records to namespaces and processes, on hand-built perf records laid
out by this kernel's real format files (tests/fixtures/tracefs): the decoders, the dispatch and
the tracker together, no kernel involved."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcpwatch.model import PEER_OTHER
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import perf
from tcpwatch.sources import tracepoints_events as events
from tcpwatch.sources.tracepoints_records import RecordReader
from tcpwatch.sources.tracepoints_tally import PENDING_LIMIT
from tcpwatch.sources.tracepoints_tasks import TaskResolver
from tcpwatch.sources.tracepoints_tracker import CLOSE_WAIT_NS, RESET_WAIT_NS, Tracker
from tcpwatch.tracepoint_stats import ABANDONED, FailedConnect, TracepointStats

from .tracepoint_records import (
    SOFTIRQ,
    comm,
    exit_,
    fixture_events,
    fork,
    lost,
    namespaces,
    sample,
    sockaddr,
    v4,
    v6,
)

CHOSEN = fixture_events()
F = CHOSEN.formats
S = CHOSEN.states
NS_A, NS_B = 4026532001, 4026532002
MS = 1_000_000
CLIENT_SK, SERVER_SK, LISTEN_SK = 0xFFFF0001, 0xFFFF0002, 0xFFFF0003


def reader(tmp_path: Path) -> RecordReader:
    tracker = Tracker(
        TaskResolver(ProcPaths(root=str(tmp_path))),
        S,
        drop_reasons=CHOSEN.drop_reasons,
        reset_reasons=CHOSEN.reset_reasons,
    )
    return RecordReader(CHOSEN, tracker)


def state(
    t: int, pid: int, sk: int, old: int, new: int, *, sport: int = 0, dport: int = 8080,
    src: str = "127.0.0.1", dst: str = "127.0.0.1", flags: int = 0,
) -> perf.Record:  # fmt: skip
    family = events.AF_INET6 if ":" in dst else events.AF_INET
    addresses = (
        {"saddr_v6": v6(src), "daddr_v6": v6(dst)}
        if family == events.AF_INET6
        else {"saddr": v4(src), "daddr": v4(dst)}
    )
    return sample(
        F[events.SET_STATE], t, pid, flags=flags, skaddr=sk, oldstate=old, newstate=new,
        sport=sport, dport=dport, family=family, protocol=6, **addresses,
    )  # fmt: skip


def error(t: int, number: int, *, sport: int, dport: int = 8080) -> perf.Record:
    return sample(
        F[events.ERROR_REPORT], t, 0, flags=SOFTIRQ, error=number, sport=sport, dport=dport,
        family=events.AF_INET, protocol=6, saddr=v4("127.0.0.1"), daddr=v4("127.0.0.1"),
    )  # fmt: skip


def sent_reset(
    t: int, reason: str, *, sk: int = 0, src: tuple[str, int], dst: tuple[str, int],
    pid: int = 0, flags: int = SOFTIRQ,
) -> perf.Record:  # fmt: skip
    number = F[events.SEND_RESET].value_of("reason", reason)
    return sample(
        F[events.SEND_RESET], t, pid, flags=flags, skaddr=sk, reason=number,
        saddr=sockaddr(*src), daddr=sockaddr(*dst),
    )  # fmt: skip


def received_reset(
    t: int, sk: int, *, src: tuple[str, int], dst: tuple[str, int], pid: int = 0
) -> perf.Record:
    return sample(
        F[events.RECEIVE_RESET], t, pid, flags=SOFTIRQ, skaddr=sk, sport=src[1], dport=dst[1],
        family=events.AF_INET, saddr=v4(src[0]), daddr=v4(dst[0]),
    )  # fmt: skip


def drop(t: int, reason: str, *, rx_sk: int = 0, pid: int = 0, flags: int = SOFTIRQ) -> perf.Record:
    number = F[events.KFREE_SKB].value_of("reason", reason)
    return sample(F[events.KFREE_SKB], t, pid, flags=flags, rx_sk=rx_sk, reason=number)


def retransmit(t: int, sk: int) -> perf.Record:
    return sample(F[events.RETRANSMIT], t, 0, flags=SOFTIRQ, skaddr=sk, state=S.syn_sent)


def born(t: int, pid: int, netns: int, name: str, parent: int = 1) -> list[perf.Record]:
    """A task forked, with its namespace, then exec'd as ``name`` (what perf's side-band says)."""
    return [fork(t, pid, parent), namespaces(t + 1, pid, netns), comm(t + 2, pid, name)]


def share(
    read: RecordReader, inode: int = NS_A, wanted: tuple[int, ...] = (NS_A,)
) -> TracepointStats:
    """The namespace's counts since the previous drain."""
    tracker = read.tracker
    tracker.update_contexts({}, wanted)
    return tracker.stats([inode], read.host(2, 4096))[inode]


def test_a_connect_is_timed_and_named_after_its_process_and_destination(tmp_path: Path) -> None:
    read = reader(tmp_path)
    records = [
        *born(1 * MS, 500, NS_A, "curl"),
        state(5 * MS, 500, CLIENT_SK, S.close, S.syn_sent),
        state(5 * MS + 300_000, 0, CLIENT_SK, S.syn_sent, S.established, sport=40000,
              flags=SOFTIRQ),
    ]  # fmt: skip
    read.handle(records)
    (row,) = share(read).connects
    assert (row.destination, row.process, row.count) == ("127.0.0.1:8080", "curl", 1)
    assert row.sum_seconds == pytest.approx(0.0003)
    assert row.buckets[3] == 1 and sum(row.buckets) == 1  # (0.1 ms, 0.3 ms]
    assert row.failures == {}


def test_records_of_two_cpus_are_handled_in_time_order(tmp_path: Path) -> None:
    """The fork is read from one CPU's ring after the connect from another's: time decides."""
    read = reader(tmp_path)
    cpu1 = [
        state(5 * MS, 500, CLIENT_SK, S.close, S.syn_sent),
        state(6 * MS, 0, CLIENT_SK, S.syn_sent, S.established, sport=40000, flags=SOFTIRQ),
    ]
    read.handle([*cpu1, *born(1 * MS, 500, NS_A, "curl")])
    assert [(row.process, row.count) for row in share(read).connects] == [("curl", 1)]


def test_a_client_that_exited_at_once_is_still_attributed(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 501, NS_A, "short"),
            state(2 * MS, 501, CLIENT_SK, S.close, S.syn_sent),
            state(3 * MS, 0, CLIENT_SK, S.syn_sent, S.established, sport=40001, flags=SOFTIRQ),
            exit_(4 * MS, 501),
        ]
    )
    assert [row.process for row in share(read).connects] == ["short"]
    assert read.tracker.tasks.resolve(501, 501) is None  # gone from the map with its exit


def test_a_refused_connect_keeps_its_port_and_errno(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 502, NS_A, "haproxy"),
            state(2 * MS, 502, CLIENT_SK, S.close, S.syn_sent, dport=9999),
            state(3 * MS, 502, CLIENT_SK, S.syn_sent, S.close, sport=53320, dport=9999),
            error(3 * MS + 1, 111, sport=53320, dport=9999),
        ]
    )
    drained = share(read)
    (row,) = drained.connects
    assert (row.destination, row.process) == ("127.0.0.1:9999", "haproxy")
    assert row.failures == {"ECONNREFUSED": 1} and row.count == 0
    # what the socket-destroy event of haproxy's abortive close still has: its local port and
    # the address, for the pipeline to give it back the port and the outcome
    assert drained.failed == (
        FailedConnect(events.AF_INET, 53320, "127.0.0.1", "127.0.0.1:9999", "ECONNREFUSED"),
    )


def test_a_connect_the_client_gave_up_is_abandoned_once_its_error_report_is_overdue(
    tmp_path: Path,
) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 503, NS_A, "client"),
            state(2 * MS, 503, CLIENT_SK, S.close, S.syn_sent),
            retransmit(1002 * MS, CLIENT_SK),
            state(1500 * MS, 503, CLIENT_SK, S.syn_sent, S.close, sport=40003),
            # tcp_disconnect's own report (SO_LINGER 0): its port is already cleared
            error(1500 * MS + 1, 104, sport=40003, dport=0),
        ]
    )
    assert share(read).connects == ()  # still waiting for an error report
    read.tracker.expire(1500 * MS + CLOSE_WAIT_NS)
    drained = share(read)
    (row,) = drained.connects
    assert row.failures == {ABANDONED: 1} and row.syn_retransmits == 1
    assert [(f.local_port, f.destination, f.error) for f in drained.failed] == [
        (40003, "127.0.0.1:8080", ABANDONED)
    ]


def test_a_timed_out_connect_counts_its_syn_retransmissions(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 504, NS_A, "client"),
            state(2 * MS, 504, CLIENT_SK, S.close, S.syn_sent),
            retransmit(1002 * MS, CLIENT_SK),
            retransmit(3002 * MS, CLIENT_SK),
            state(7002 * MS, 0, CLIENT_SK, S.syn_sent, S.close, sport=40004, flags=SOFTIRQ),
            error(7002 * MS + 1, 110, sport=40004),
        ]
    )
    (row,) = share(read).connects
    assert row.failures == {"ETIMEDOUT": 1} and row.syn_retransmits == 2


def test_a_handshake_that_needed_a_retransmission_lands_past_one_second(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 505, NS_A, "client"),
            state(2 * MS, 505, CLIENT_SK, S.close, S.syn_sent),
            retransmit(1002 * MS, CLIENT_SK),
            state(1003 * MS, 0, CLIENT_SK, S.syn_sent, S.established, sport=40005,
                  flags=SOFTIRQ),
        ]
    )  # fmt: skip
    (row,) = share(read).connects
    assert row.buckets[11] == 1  # (1 s, 3 s]
    assert (row.retransmitted, row.syn_retransmits) == (1, 1)


def test_a_connect_whose_end_never_arrived_is_counted_not_timed(tmp_path: Path) -> None:
    """The kernel delivered neither the SYN retransmission nor the ESTABLISHED record of one
    connect (6.18, lost count 0): the socket is next seen closing from LAST_ACK. The connect is
    not in the row (its time is unknown) and the miss is counted; a connected client's end and
    a socket nobody followed count nothing."""
    last_ack = F[events.SET_STATE].value_of("newstate", "TCP_LAST_ACK")
    fin_wait2 = F[events.SET_STATE].value_of("newstate", "TCP_FIN_WAIT2")
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 508, NS_A, "client"),
            state(2 * MS, 508, CLIENT_SK, S.close, S.syn_sent),
            state(1030 * MS, 508, CLIENT_SK, last_ack, S.close, sport=40008),
            state(1031 * MS, 508, CLIENT_SK, S.close, S.syn_sent),
            state(1032 * MS, 0, CLIENT_SK, S.syn_sent, S.established, sport=40009,
                  flags=SOFTIRQ),
            state(1033 * MS, 508, CLIENT_SK, last_ack, S.close, sport=40009),
            state(1034 * MS, 0, SERVER_SK, fin_wait2, S.close, sport=8080, flags=SOFTIRQ),
        ]
    )  # fmt: skip
    (row,) = share(read).connects
    assert (row.count, row.retransmitted) == (1, 0)
    assert read.tracker.unattributed == {("set_state", "connect_end_unseen"): 1}
    assert read.tracker.sockets == {}


def test_a_task_older_than_the_reader_is_read_from_proc(tmp_path: Path) -> None:
    task = tmp_path / "600" / "task" / "601" / "ns"
    task.mkdir(parents=True)
    (task / "net").write_text("")
    (tmp_path / "600" / "comm").write_text("nginx\n")
    inode = os.stat(task / "net").st_ino
    read = reader(tmp_path)
    # pid 600's main thread has no /proc/600/task/600: it exited before it was asked about
    read.handle([state(2 * MS, 600, CLIENT_SK, S.close, S.syn_sent)])
    assert read.tracker.unattributed == {("set_state", "task_exited"): 1}
    read.handle(
        [
            sample(F[events.SET_STATE], 3 * MS, 600, 601, skaddr=SERVER_SK, oldstate=S.close,
                   newstate=S.syn_sent, dport=80, family=events.AF_INET, protocol=6,
                   daddr=v4("10.0.0.5")),
            state(4 * MS, 0, SERVER_SK, S.syn_sent, S.established, sport=40006, dport=80,
                  dst="10.0.0.5", flags=SOFTIRQ),
        ]
    )  # fmt: skip
    (row,) = share(read, inode, (inode,)).connects
    assert (row.destination, row.process, row.count) == ("10.0.0.5:80", "nginx", 1)


def test_a_connect_seen_only_from_interrupt_context_is_counted_not_guessed(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 507, NS_A, "client"),
            state(2 * MS, 507, CLIENT_SK, S.close, S.syn_sent, flags=SOFTIRQ),
            state(3 * MS, 0, SERVER_SK, S.syn_sent, S.established, sport=1, flags=SOFTIRQ),
        ]
    )
    assert share(read).connects == ()
    assert read.tracker.unattributed == {
        ("set_state", "interrupt"): 1,
        ("set_state", "connect_unseen"): 1,
    }


def test_a_listener_names_the_drops_at_it_until_it_closes(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 508, NS_A, "nginx"),
            state(2 * MS, 508, LISTEN_SK, S.close, S.listen, src="0.0.0.0", sport=8080, dport=0,
                  dst="0.0.0.0"),
            drop(3 * MS, "TCP_LISTEN_OVERFLOW", rx_sk=LISTEN_SK),
            drop(4 * MS, "TCP_LISTEN_OVERFLOW", rx_sk=LISTEN_SK),
            state(5 * MS, 508, LISTEN_SK, S.listen, S.close, src="0.0.0.0", sport=8080),
            # the address freed, now another socket's, perhaps another namespace's
            drop(6 * MS, "TCP_LISTEN_OVERFLOW", rx_sk=LISTEN_SK),
        ]
    )  # fmt: skip
    assert [(d.reason, d.listener, d.count) for d in share(read).drops] == [
        ("TCP_LISTEN_OVERFLOW", "0.0.0.0:8080", 2)
    ]
    assert read.tracker.unattributed == {("drop", "unknown_socket"): 1}


def test_a_drop_without_a_socket_belongs_to_the_task_that_sent_it(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 509, NS_A, "client"),
            drop(2 * MS, "NETFILTER_DROP", pid=509, flags=0),  # the OUTPUT hook, in connect()
            drop(3 * MS, "NETFILTER_DROP", pid=509, flags=SOFTIRQ),  # softirq: whoever ran
        ]
    )
    assert [(d.reason, d.listener, d.count) for d in share(read).drops] == [
        ("NETFILTER_DROP", "", 1)
    ]
    assert read.tracker.unattributed == {("drop", "interrupt"): 1}


def test_a_reset_for_no_socket_on_loopback_joins_the_client_that_receives_it(
    tmp_path: Path,
) -> None:
    read = reader(tmp_path)
    server, client = ("127.0.0.1", 9999), ("127.0.0.1", 40010)
    read.handle(
        [
            *born(1 * MS, 510, NS_A, "client"),
            state(2 * MS, 510, CLIENT_SK, S.close, S.syn_sent, dport=9999),
            sent_reset(3 * MS, "NO_SOCKET", src=server, dst=client),
            received_reset(3 * MS + 1, CLIENT_SK, src=client, dst=server, pid=510),
        ]
    )
    resets = [(r.direction, r.peer, r.reason, r.count) for r in share(read).resets]
    assert resets == [
        ("received", "127.0.0.1:9999", "", 1),
        ("sent", "127.0.0.1:9999", "NO_SOCKET", 1),
    ]


def test_resets_for_no_socket_that_nobody_here_receives_are_counted(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            sent_reset(1 * MS, "NO_SOCKET", src=("10.0.0.1", 22), dst=("10.9.9.9", 5555)),
            sent_reset(2 * MS, "NO_SOCKET", src=("127.0.0.1", 23), dst=("127.0.0.1", 5556)),
        ]
    )
    assert read.tracker.unattributed == {("send_reset", "interrupt"): 1}
    read.tracker.expire(2 * MS + RESET_WAIT_NS)
    assert read.tracker.unattributed == {
        ("send_reset", "interrupt"): 1,
        ("send_reset", "no_socket"): 1,
    }
    assert share(read).resets == ()


def test_an_abortive_close_names_the_service_side(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 511, NS_A, "app"),
            sent_reset(2 * MS, "TCP_ABORT_ON_CLOSE", sk=SERVER_SK, src=("10.0.0.1", 40011),
                       dst=("10.0.0.9", 5432), pid=511, flags=0),
            sent_reset(3 * MS, "TCP_ABORT_ON_CLOSE", sk=SERVER_SK, src=("10.0.0.1", 8443),
                       dst=("10.0.0.9", 51000), pid=511, flags=0),
        ]
    )  # fmt: skip
    assert [(r.peer, r.reason) for r in share(read).resets] == [
        ("10.0.0.1:8443", "TCP_ABORT_ON_CLOSE"),  # inbound: the local service port
        ("10.0.0.9:5432", "TCP_ABORT_ON_CLOSE"),  # outbound: the destination
    ]


def test_namespaces_not_polled_are_counted_apart(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.tracker.update_contexts({}, (NS_A,))
    read.handle(
        [
            *born(1 * MS, 512, NS_B, "other"),
            state(2 * MS, 512, CLIENT_SK, S.close, S.syn_sent),
            state(3 * MS, 0, CLIENT_SK, S.syn_sent, S.established, sport=4, flags=SOFTIRQ),
        ]
    )
    assert share(read).connects == ()
    assert read.tracker.other_netns == 1


def test_a_thread_that_enters_another_namespace_connects_from_there(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 513, NS_A, "runner"),
            state(2 * MS, 513, CLIENT_SK, S.close, S.syn_sent, dport=1),
            state(3 * MS, 0, CLIENT_SK, S.syn_sent, S.established, sport=5, dport=1,
                  flags=SOFTIRQ),
            namespaces(4 * MS, 513, NS_B),  # setns()
            state(5 * MS, 513, SERVER_SK, S.close, S.syn_sent, dport=2),
            state(6 * MS, 0, SERVER_SK, S.syn_sent, S.established, sport=6, dport=2,
                  flags=SOFTIRQ),
        ]
    )  # fmt: skip
    assert [row.destination for row in share(read, NS_A, (NS_A, NS_B)).connects] == ["127.0.0.1:1"]
    assert [row.destination for row in share(read, NS_B, (NS_A, NS_B)).connects] == ["127.0.0.1:2"]


def test_a_child_keeps_its_parents_name_until_it_execs(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 514, NS_A, "bash"),
            fork(2 * MS, 515, 514),
            namespaces(2 * MS + 1, 515, NS_A),
            state(3 * MS, 515, CLIENT_SK, S.close, S.syn_sent, dport=1),
            comm(4 * MS, 515, "curl"),
            state(5 * MS, 515, SERVER_SK, S.close, S.syn_sent, dport=2),
        ]
    )
    read.handle(
        [
            state(6 * MS, 0, CLIENT_SK, S.syn_sent, S.established, sport=7, dport=1,
                  flags=SOFTIRQ),
            state(6 * MS, 0, SERVER_SK, S.syn_sent, S.established, sport=8, dport=2,
                  flags=SOFTIRQ),
        ]
    )  # fmt: skip
    assert [(row.destination, row.process) for row in share(read).connects] == [
        ("127.0.0.1:1", "bash"),
        ("127.0.0.1:2", "curl"),
    ]


def test_a_drain_holds_what_was_counted_since_the_previous_one(tmp_path: Path) -> None:
    """Which keys get rows is the pipeline's budget's decision (test_peer_budget.py): the
    source hands over each namespace's counts since its previous drain, every key."""
    read = reader(tmp_path)
    read.handle([*born(1 * MS, 516, NS_A, "client"), *connect_burst(10 * MS, 516, 1, 3, 0xAB00)])
    first = share(read)
    assert [(r.destination, r.count) for r in first.connects] == [("127.0.0.1:1", 3)]
    assert first.pending and first.folded == {"connects": 0, "resets": 0, "drops": 0}
    read.handle(connect_burst(100 * MS, 516, 2, 2, 0xAC00))
    assert [(r.destination, r.count) for r in share(read).connects] == [("127.0.0.1:2", 2)]
    assert share(read).connects == ()


def test_a_flood_of_new_keys_between_two_drains_folds_past_the_limit(tmp_path: Path) -> None:
    read = reader(tmp_path)
    records = born(1 * MS, 517, NS_A, "scanner")
    for port in range(1, PENDING_LIMIT + 3):
        records += connect_burst(port * 10 * MS, 517, port, 1, 0x100000 + port * 4)
    read.handle(records)
    drained = share(read)
    assert len(drained.connects) == PENDING_LIMIT + 1  # the limit's keys and "other"
    assert [(r.destination, r.process, r.count) for r in drained.connects][-1] == (
        PEER_OTHER, PEER_OTHER, 2,
    )  # fmt: skip
    assert drained.folded["connects"] == 2


def test_ipv6_destinations_are_written_as_users_write_them(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle(
        [
            *born(1 * MS, 517, NS_A, "client"),
            state(2 * MS, 517, CLIENT_SK, S.close, S.syn_sent, src="::", dst="::1", dport=443),
            state(3 * MS, 0, CLIENT_SK, S.syn_sent, S.established, src="::1", dst="::1",
                  sport=9, dport=443, flags=SOFTIRQ),
        ]
    )  # fmt: skip
    assert [row.destination for row in share(read).connects] == ["[::1]:443"]


def test_lost_records_and_records_per_event_are_counted(tmp_path: Path) -> None:
    read = reader(tmp_path)
    read.handle([lost(1 * MS, 7), lost(2 * MS, 5), retransmit(3 * MS, CLIENT_SK)])
    host = read.host(2, 4096)
    assert host.lost == 12
    assert host.records["retransmit"] == 1 and host.records["set_state"] == 0
    assert host.unattributed == {("retransmit", "unknown_socket"): 1}


def connect_burst(start: int, pid: int, port: int, count: int, sk_base: int) -> list[perf.Record]:
    """``count`` completed connects by ``pid`` to 127.0.0.1:``port``."""
    records: list[perf.Record] = []
    for i in range(count):
        sk, t = sk_base + i, start + i * 10 * MS
        records += [
            state(t, pid, sk, S.close, S.syn_sent, dport=port),
            state(t + 1, 0, sk, S.syn_sent, S.established, sport=40000 + i, dport=port,
                  flags=SOFTIRQ),
        ]  # fmt: skip
    return records


def test_a_reset_for_no_socket_from_an_address_of_tcpwatchs_own_namespace_is_its(
    tmp_path: Path,
) -> None:
    read = reader(tmp_path)
    read.tracker.own = (NS_A, frozenset({v4("10.0.0.1") + bytes(12)}))
    read.handle(
        [
            sent_reset(1 * MS, "NO_SOCKET", src=("10.0.0.1", 22), dst=("10.9.9.9", 5555)),
            sent_reset(2 * MS, "NO_SOCKET", src=("10.0.0.2", 22), dst=("10.9.9.9", 5556)),
        ]
    )
    assert [(r.direction, r.peer, r.reason, r.count) for r in share(read).resets] == [
        ("sent", "10.0.0.1:22", "NO_SOCKET", 1)
    ]
    assert read.tracker.unattributed == {("send_reset", "interrupt"): 1}
