"""Issue 22 item 9: what a healthy or unprivileged host learns from `check`: the rules, the
namespaces, the window, the listeners and sockets checked; why six sources with --window 0; and,
when owners could not be named, which privilege would name them."""

from __future__ import annotations

import json
from dataclasses import replace

from tcpwatch.model import Attribution
from tcpwatch.render.json import checked_of, render_json
from tcpwatch.render.scope import Scope
from tcpwatch.render.text import render_text
from tests.unit.snapshots import NGINX, listener, snapshot, socket_table

TABLE = socket_table(
    [listener(80, inode=5003), listener(443, inode=5004), listener(8080, inode=5005)],
    states={"established": 40, "time_wait": 7},
)


def report(*snapshots: object, scope: Scope | None = None, verbose: bool = False) -> list[str]:
    return render_text([], list(snapshots), False, verbose, scope=scope).splitlines()  # type: ignore[arg-type]


def test_a_healthy_host_says_what_was_checked() -> None:
    lines = report(snapshot(sockets=TABLE), scope=Scope(rules=24, window=5.0))
    assert lines[0] == "TCPWATCH OK - no findings"
    assert (
        lines[1]
        == "checked  24 rules in 1 namespace over a 5 s window: 3 listeners, 50 TCP sockets"
    )
    two = report(snapshot(sockets=TABLE), snapshot(netns="blue", sockets=TABLE),
                 scope=Scope(rules=1, window=0.0))  # fmt: skip
    assert two[1].startswith("checked  1 rule in 2 namespaces, one snapshot (--window 0:")
    assert "no lifecycle source: connection outcomes need a window): 6 listeners" in two[1]
    remote = report(snapshot(sockets=None), scope=Scope(24, 15.0, "http://10.0.0.5:9477"))
    assert (
        remote[1]
        == "checked  by the daemon at http://10.0.0.5:9477: 1 namespace, the daemon's last 15 s"
    )


def test_verbose_lists_each_source_with_its_time_and_the_sockets_by_state() -> None:
    lines = report(snapshot(sockets=TABLE), scope=Scope(24, 5.0), verbose=True)
    assert lines[3] == (
        "  sources: sysctl 1.0 ms, sockstat 1.0 ms, counters 1.0 ms, sockdiag 1.0 ms, "
        "processes 1.0 ms"
    )
    assert lines[4] == "  sockets: 40 established, 7 time-wait, 3 listen"
    assert not any(line.startswith("  sources:") for line in report(snapshot(), scope=Scope(1, 5)))


def denied(count: int, owners: dict[int, object]) -> Attribution:
    return Attribution(owners, processes_scanned=10, complete=False, processes_denied=count)  # type: ignore[arg-type]


def test_unnamed_owners_say_which_privilege_would_name_them() -> None:
    unprivileged = replace(snapshot(sockets=TABLE), attribution=denied(57, {5003: NGINX}))
    (note,) = [line for line in report(unprivileged, scope=Scope(24, 5.0)) if line.startswith("!")]
    assert note == (
        "! owners not all named: 2 listeners without an owner; the descriptors of 57 processes "
        "could not be read (run as root, or with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH as "
        "tcpwatch.service grants)"
    )
    privileged = report(unprivileged, scope=Scope(24, 5.0, privileged=True))
    assert any("even with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH" in line for line in privileged)
    # Every owner found, or nothing denied: nothing to say.
    named = replace(snapshot(sockets=TABLE), attribution=Attribution({}, 10, complete=True))
    assert not any(line.startswith("!") for line in report(named, scope=Scope(24, 5.0)))


def test_the_note_counts_only_the_listeners_whose_owners_were_looked_for() -> None:
    """With Q05 disabled check looks only for the owners its rules read (owner_needs.py): a
    listener it never looked for has no owner in the attribution, but was not missed."""
    one_missed = replace(denied(57, {5003: NGINX}), looked_for=frozenset({5003, 5004}))
    lines = report(replace(snapshot(sockets=TABLE), attribution=one_missed), scope=Scope(24, 5.0))
    (note,) = [line for line in lines if line.startswith("!")]
    assert note.startswith(
        "! owners not all named: 1 listener without an owner; the descriptors of 57 processes"
    )
    # Only a CLOSE_WAIT socket's owner was looked for (and not found): no listener was missed.
    close_wait_only = replace(denied(57, {}), looked_for=frozenset({7001}))
    lines = report(
        replace(snapshot(sockets=TABLE), attribution=close_wait_only), scope=Scope(24, 5.0)
    )
    (note,) = [line for line in lines if line.startswith("!")]
    assert note.startswith("! owners not all named: the descriptors of 57 processes could not")
    document = json.loads(
        render_json(
            [],
            [replace(snapshot(sockets=TABLE), attribution=one_missed)],
            5.0,
            scope=Scope(rules=24, window=5.0),
        )
    )
    assert document["checked"]["owners_note"].startswith(
        "owners not all named: 1 listener without an owner; the descriptors of 57 processes"
    )


def test_the_json_report_says_what_was_checked_too() -> None:
    unprivileged = replace(snapshot(sockets=TABLE), attribution=denied(57, {5003: NGINX}))
    unread = snapshot(netns="blue", sockets=None)
    document = json.loads(
        render_json([], [unprivileged, unread], 5.0, scope=Scope(rules=24, window=5.0))
    )
    assert [(n["netns"], n["listeners"], n["sockets"]) for n in document["namespaces"]] == [
        ("host", 3, 50),
        ("blue", None, None),  # its table was not read: unknown, not 0
    ]
    assert document["checked"]["rules"] == 24 and document["checked"]["daemon"] is None
    assert document["checked"]["owners_note"].startswith(
        "owners not all named: 2 listeners without an owner; the descriptors of 57 processes"
    )
    named = replace(snapshot(sockets=TABLE), attribution=Attribution({}, 10, complete=True))
    quiet = json.loads(render_json([], [named], 5.0, scope=Scope(rules=24, window=5.0)))
    assert quiet["checked"] == {
        "daemon": None,
        "rules": 24,
        "owners_note": None,
        "owners": None,  # no local daemon asked
    }
    # A daemon's document (no scope of a check) has no "checked"; check --from says whose.
    assert "checked" not in json.loads(render_json([], [named], 5.0))
    remote = checked_of([named], Scope(rules=0, window=5.0, daemon="http://10.0.0.5:9477"))
    assert remote == {
        "daemon": "http://10.0.0.5:9477",
        "rules": None,
        "owners_note": None,
        "owners": None,
    }
