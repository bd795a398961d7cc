"""Q05 on built snapshots: a listener's owner near its RLIMIT_NOFILE."""

from __future__ import annotations

from tcpwatch.model import ProcessRef
from tcpwatch.rules import Finding, RuleSettings, evaluate
from tcpwatch.rules.owners import suggested_nofile
from tests.unit.snapshots import (
    NGINX,
    T0,
    listener,
    owner_process,
    snapshot,
    socket_table,
    window,
)

APP = ProcessRef(4321, "app-server")


def q05(
    *described: object, owners: dict[int, ProcessRef] | None = None, **settings: RuleSettings
) -> list[Finding]:
    table = socket_table(
        [
            listener(80, queue_length=12, queue_max=511, inode=7001),
            listener(443, queue_length=3, queue_max=511, inode=7002),
            listener(9000, inode=7003),
        ]
    )
    current = snapshot(
        sockets=table,
        owners={7001: NGINX, 7002: NGINX, 7003: APP} if owners is None else owners,
        described=described,  # type: ignore[arg-type]
    )
    return [f for f in evaluate(window(current), dict(settings)) if f.rule_id == "Q05"]


def test_q05_warning_at_80_percent_names_process_listeners_and_limit() -> None:
    (finding,) = q05(owner_process(1234, "nginx", open_fds=850, max_fds=1024, listeners=2))
    assert finding.severity == "warning"
    assert finding.subject == "nginx"  # the pid is evidence: a restart keeps the series
    assert finding.title.startswith("nginx[1234], listening on")
    assert dict(finding.evidence) == {
        "process": "nginx",
        "pid": 1234,
        "user": "www-data",
        "open_fds": 850,
        "max_fds": 1024,
        "max_fds_hard": 524288,
        "fd_ratio": 0.8301,
        "listeners": "0.0.0.0:80, 0.0.0.0:443",
        "accept_queue_length": 15,
        "started_at": T0 - 3600,
    }
    assert "850 of its 1024 file descriptors" in finding.title
    assert "LimitNOFILE=65536:524288" in finding.remediation
    assert "prlimit --pid 1234 --nofile=65536:" in finding.remediation
    assert "ulimit -n 65536" in finding.remediation
    assert "grep 'open files' /proc/1234/limits" in finding.remediation


def test_q05_critical_at_the_limit_says_accept_fails() -> None:
    (finding,) = q05(owner_process(1234, "nginx", open_fds=1024, max_fds=1024, max_fds_hard=1024))
    assert finding.severity == "critical"
    assert "accept() is failing with EMFILE" in finding.title
    # The hard limit is below the new soft one: both are raised.
    assert "LimitNOFILE=65536," in finding.remediation
    assert "--nofile=65536 " in finding.remediation + " "


def test_q05_silent_with_room_unlimited_or_not_described() -> None:
    assert q05(owner_process(1234, "nginx", open_fds=500, max_fds=1024)) == []
    assert q05(owner_process(1234, "nginx", open_fds=5000, max_fds=None, max_fds_hard=None)) == []
    assert q05() == []  # the owners source described no one (exited, denied)
    # Described, but owning no listener in this namespace (a CLOSE_WAIT holder only).
    holder = owner_process(77, "worker", open_fds=1000, max_fds=1024, listeners=0, close_wait=9)
    assert q05(holder) == []


def test_q05_silent_when_the_owners_source_did_not_run() -> None:
    current = snapshot(owners={7001: NGINX}, described=None)
    assert [f for f in evaluate(window(current), {}) if f.rule_id == "Q05"] == []


def test_q05_thresholds_are_configurable() -> None:
    settings = RuleSettings(thresholds={"warning": 0.4, "critical": 0.5})
    (finding,) = q05(owner_process(4321, "app-server", open_fds=450, max_fds=1024), Q05=settings)
    assert finding.severity == "warning" and finding.subject == "app-server"
    (finding,) = q05(owner_process(4321, "app-server", open_fds=520, max_fds=1024), Q05=settings)
    assert finding.severity == "critical"


def test_suggested_limit_has_room() -> None:
    assert suggested_nofile(owner_process(1, "x", open_fds=900)) == 65536
    assert suggested_nofile(owner_process(1, "x", open_fds=30000)) == 131072
