"""Status that tells the truth (issue 12, item 8): degraded sources in every output, a netns label
that survives a transient procfs failure, and no loop over a kernel-supplied port range."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tcpwatch import snapshot
from tcpwatch.config import CollectSettings
from tcpwatch.endpoints import ports_available
from tcpwatch.model import Snapshot, SourceStatus, Sysctls
from tcpwatch.paths import ProcPaths
from tcpwatch.render.prometheus import render
from tcpwatch.render.text import render_text
from tcpwatch.sources.netns import NetnsNames, name_rank
from tcpwatch.sources.registry import source_names
from tcpwatch.state import ExportState, PollHistogram

# No source runs: these tests are about the names the poll gives, not what sources read.
NO_SOURCES = CollectSettings(
    disabled_sources=tuple(name for name in source_names() if name != "netns")
)


def state_of(*snapshots: Snapshot) -> ExportState:
    return ExportState(
        snapshots=snapshots,
        findings=(),
        last_poll=1.7e9,
        poll_durations=PollHistogram(),
        source_errors={},
    )


def bare(netns: str = "host", **fields: Any) -> Snapshot:
    return replace(Snapshot(netns, 1.7e9, None, None, None, None, None), **fields)


# -- (d) never a loop over a kernel-supplied range ---------------------------------------------


def test_a_huge_port_range_renders_at_once() -> None:
    # Before: one Python iteration per port of the range on every render (tens of seconds for
    # this one). Only a --path.procfs tree can hold such a range (the kernel bounds its own).
    sysctls = Sysctls(
        {"net.ipv4.ip_local_port_range": (0, 5 * 10**7)},
        reserved_ports=((100, 199), (10, 10**6), (5 * 10**7, 6 * 10**7)),
    )
    started = time.perf_counter()
    text = render(state_of(bare(sysctls=sysctls)), include_process=False).decode()
    assert time.perf_counter() - started < 1.0
    assert 'tcpwatch_ephemeral_port_range_size{netns="host"} 4.9000009e+07' in text


def test_overlapping_reservations_count_each_port_once() -> None:
    assert ports_available(1, 1000, ((10, 10**6), (100, 199), (0, 5))) == 4
    assert ports_available(1, 1000, ((500, 600), (550, 650), (900, 899))) == 849


# -- (a) degraded, shown everywhere ------------------------------------------------------------


def test_a_degraded_source_is_up_and_counts_what_it_left_out() -> None:
    statuses = (
        SourceStatus("sysctl", True, 0.001, skipped=("/proc/sys/net/ipv4/tcp_mem:1: bad", "x")),
        SourceStatus("sockstat", True, 0.001),
        SourceStatus("counters", False, 0.001, "gone"),
    )
    state = state_of(bare(sources=statuses))
    text = render(state, include_process=False).decode()
    assert 'tcpwatch_source_up{netns="host",source="sysctl"} 1.0' in text
    assert 'tcpwatch_source_degraded{netns="host",source="sysctl"} 2.0' in text
    assert 'tcpwatch_source_degraded{netns="host",source="sockstat"} 0.0' in text
    assert 'tcpwatch_source_degraded{netns="host",source="counters"} 0.0' in text
    report = render_text([], list(state.snapshots), color=False)
    assert "sources 2 ok (1 degraded), 1 failed" in report
    assert (
        "! source sysctl degraded in netns host: left out 2 field(s): "
        "/proc/sys/net/ipv4/tcp_mem:1: bad; x"
    ) in report


# -- (c) a netns label that survives a transient failure ---------------------------------------


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("unknown", "ns:4026532247"),
        ("ns:4026532247", "cni-0a1b2c3d-0000-4000-8000-00000000abcd"),
        ("cni-0a1b2c3d-0000-4000-8000-00000000abcd", "container:3f2a9c1d0b7e"),
        ("container:3f2a9c1d0b7e", "pod:shop/web-7d9f"),
        ("pod:shop/web-7d9f", "blue"),
        ("blue#4026532247", "host"),
    ],
)
def test_name_ranks_follow_the_naming_order(lower: str, higher: str) -> None:
    assert name_rank(lower) < name_rank(higher)


def test_a_weaker_fresh_name_keeps_the_remembered_one() -> None:
    names = NetnsNames()
    assert names.settle(7, "pod:shop/web") == "pod:shop/web"
    assert names.settle(7, "container:3f2a9c1d0b7e") == "pod:shop/web"  # hostname unreadable
    assert names.settle(7, "ns:7") == "pod:shop/web"
    assert names.settle(8, "ns:8") == "ns:8"  # another namespace: its own name
    assert names.settle(8, "blue") == "blue"  # named since: a better name replaces it
    names.keep({8})
    assert names.settle(7, "ns:7") == "ns:7"  # forgotten once a poll no longer saw it


def fake_proc(root: Path) -> None:
    """A procfs tree in which we (pid 'self') and pid 1 share one namespace file: "host"."""
    (root / "self" / "ns").mkdir(parents=True)
    (root / "self" / "ns" / "net").write_text("")
    for pid in ("1", "5"):
        (root / pid / "ns").mkdir(parents=True)
        os.link(root / "self" / "ns" / "net", root / pid / "ns" / "net")


@pytest.mark.parametrize("selection", [("self",), ("all",)])
def test_the_label_stays_while_procfs_is_briefly_unreadable(
    tmp_path: Path, selection: tuple[str, ...]
) -> None:
    proc = tmp_path / "proc"
    fake_proc(proc)
    run_netns = tmp_path / "run-netns"
    run_netns.mkdir()
    paths = ProcPaths(root=str(proc))
    names = NetnsNames()

    def polled() -> list[str]:
        snapshots = snapshot.poll(
            NO_SOURCES, selection, paths, run_netns_dir=str(run_netns), names=names
        )
        return [s.netns for s in snapshots]

    def fresh() -> list[str]:  # what a poll without memory calls it
        snapshots = snapshot.poll(NO_SOURCES, selection, paths, run_netns_dir=str(run_netns))
        return [s.netns for s in snapshots]

    assert polled() == ["host"]
    os.unlink(proc / "1" / "ns" / "net")  # /proc/1 unreadable for a moment
    assert fresh() == ["ns:{}".format(os.stat(proc / "self" / "ns" / "net").st_ino)]
    assert polled() == ["host"]
    os.unlink(proc / "5" / "ns" / "net")
    assert fresh() == ["ns:{}".format(os.stat(proc / "self" / "ns" / "net").st_ino)]
    assert polled() == ["host"]
    os.rename(proc / "self", proc / "gone")  # /proc/self unreadable too
    assert fresh() == ["unknown"]
    assert polled() == ["host"]


def test_check_from_a_daemon_keeps_what_a_degraded_source_left_out() -> None:
    from tcpwatch.client import parse_daemon_url, report_from_document
    from tcpwatch.render.json import report_document

    statuses = (SourceStatus("sysctl", True, 0.001, skipped=("tcp_mem: bad",)),)
    document = json.loads(json.dumps(report_document([], [bare(sources=statuses)], 1.7e9)))
    report = report_from_document(parse_daemon_url("http://127.0.0.1"), document)
    assert report.snapshots[0].sources == statuses


def test_a_degraded_source_is_logged_when_it_starts_then_rarely(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from tcpwatch.history import SourceFailureLog

    now = [0.0]
    failures = SourceFailureLog(repeat_seconds=300.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    degraded = bare(sources=(SourceStatus("sysctl", True, 0.001, skipped=("tcp_mem: bad",)),))
    for _ in range(20):  # 285 s
        failures.record([degraded])
        now[0] += 15
    failures.record([degraded])  # 300 s: the reminder
    failures.record([bare(sources=(SourceStatus("sysctl", True, 0.001),))])  # whole again
    failures.record([degraded])  # degraded again: a new first line
    message = (
        "source sysctl in netns host left out 1 field: tcp_mem: bad (tcpwatch_source_degraded; "
        "repeated at most every 300 s)"
    )
    assert [r.getMessage() for r in caplog.records] == [message] * 3
