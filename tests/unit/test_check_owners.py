"""Issue 20 item 4: check's owners from the local daemon (cli_owners.py, /api/v1/owners): the
endpoint's answer, reading it within bounds, and confirming every location before use, on fixture
procfs trees and a fake daemon, including one that lies."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from tcpwatch.cli_owners import AnswerError, http_get, parse_owners
from tcpwatch.jsonshape import ShapeError
from tcpwatch.model import Attribution, ProcessRef
from tcpwatch.render import api
from tcpwatch.render.scope import OwnersOrigin, Scope, owners_line, owners_of
from tcpwatch.sources.lookup import ListeningSocket
from tcpwatch.sources.processes import scan_owners
from tcpwatch.state import ExportState
from tcpwatch.top.local import Listening, Verdict, verify_claimed

from .snapshots import T1, listener, snapshot, socket_table
from .test_api import documented
from .test_processes import build_proc

URL = "http://127.0.0.1:9477"


def daemon_state() -> ExportState:
    table = socket_table(listeners=[listener(8080, inode=900)], close_wait_inodes=[11, 12, 13])
    owners = {
        900: ProcessRef(40, "nginx"),
        11: ProcessRef(41, "<script>"),
        12: ProcessRef(41, "<script>"),
        13: ProcessRef(43, "gone"),
    }
    locations = {900: (40, "6"), 11: (41, "9"), 12: (41, "10"), 13: (99, "3")}  # 13: pid differs
    base = snapshot(sockets=table, owners=owners)
    assert base.attribution is not None
    attribution = Attribution(owners, 5, True, locations=locations)
    return ExportState((replace(base, attribution=attribution),), (), last_poll=T1)


def test_owners_document_lists_listeners_first_and_pages() -> None:
    document = json.loads(json.dumps(api.owners_document(daemon_state(), 1000)))
    assert set(document) == documented("The owners answer")
    assert document["total"] == 3  # 13's location is not its owner's: not offered
    assert document["owners"] == [
        {"inode": 900, "pid": 40, "fd": 6, "process": "nginx", "listener": True},
        {"inode": 11, "pid": 41, "fd": 9, "process": "<script>", "listener": False},
        {"inode": 12, "pid": 41, "fd": 10, "process": "<script>", "listener": False},
    ]
    page = api.owners_document(daemon_state(), 1, 1)
    assert [item["inode"] for item in page["owners"]] == [11]
    assert (page["total"], page["offset"], page["limit"]) == (3, 1, 1)
    assert api.owners_query({"limit": "10000", "offset": "2"}) == (10000, 2)
    with pytest.raises(api.QueryError, match="limit: expected an integer from 1 to 10000"):
        api.owners_query({"limit": "10001"})


def test_parse_owners_takes_locations_and_refuses_a_wrong_field() -> None:
    document = api.owners_document(daemon_state(), 1000)
    assert parse_owners(document) == {900: (40, "6"), 11: (41, "9"), 12: (41, "10")}
    for bad, message in (
        ({"owners": [{"inode": 1, "pid": "40", "fd": 3}]}, r"owners\[0\].pid: expected a whole"),
        ({"owners": [{"inode": 1, "pid": 40}]}, r"owners\[0\].fd: missing"),
        ({"owners": [{"inode": 0, "pid": 40, "fd": 3}]}, "positive inode"),
        ({"owners": [{"inode": 7, "pid": 40, "fd": -1}]}, "positive inode"),
        ({"owners": {}}, "owners: expected a list"),
    ):
        with pytest.raises(ShapeError, match=message):
            parse_owners(bad)


# -- confirming: nothing the daemon says is believed before a readlink ----------------------------


def test_a_lying_or_stale_location_is_dropped_and_walked_for(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {
            40: ("nginx", {6: "socket:[900]"}),
            41: ("worker", {9: "socket:[11]", 10: "socket:[555]", 12: "socket:[12]"}),
            50: ("sshd", {3: "socket:[13]"}),
        },
    )
    # The daemon says: 900 right; 11 right; 12 at fd 10 (stale: now another socket); 13 in a
    # process that does not exist; and a name the process does not have.
    hints = Attribution(
        owners={},
        processes_scanned=0,
        complete=False,
        locations={900: (40, "6"), 11: (41, "9"), 12: (41, "10"), 13: (77, "3")},
    )
    found = scan_owners(paths, frozenset({900, 11, 12, 13}), known=hints)
    assert found.owners == {
        900: ProcessRef(40, "nginx"),  # names from /proc/PID/comm, not from the daemon
        11: ProcessRef(41, "worker"),
        12: ProcessRef(41, "worker"),  # found by the walk, at its real descriptor
        13: ProcessRef(50, "sshd"),
    }
    assert found.confirmed == 2 and found.complete
    assert found.locations[12] == (41, "12") and found.processes_scanned >= 2


def test_a_complete_and_true_answer_spares_the_walk(tmp_path: Path) -> None:
    paths = build_proc(tmp_path, {40: ("nginx", {6: "socket:[900]"}), 41: ("x", {})})
    hints = Attribution({}, 0, False, locations={900: (40, "6")})
    found = scan_owners(paths, frozenset({900}), known=hints)
    assert (found.owners, found.confirmed, found.processes_scanned) == (
        {900: ProcessRef(40, "nginx")},
        1,
        0,
    )


def test_the_daemons_listener_must_be_held_by_tcpwatch_as_it_claims(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {
            812: ("tcpwatch", {4: "socket:[70]"}),
            813: ("python3", {4: "socket:[71]"}),
        },
    )
    (tmp_path / "812" / "cmdline").write_bytes(b"/usr/bin/python3\0/usr/bin/tcpwatch\0serve\0")
    (tmp_path / "813" / "cmdline").write_bytes(b"python3\0-m\0http.server\0")
    ours = ListeningSocket("ipv4", "127.0.0.1", 9477, 0, 70)
    listening = Listening(Verdict(True, "daemon uid 0"), URL, (ours,))
    assert verify_claimed(listening, paths, {70: (812, "4")}) == Verdict(
        True, "daemon pid 812, uid 0"
    )
    # A claim the readlink does not bear out, none at all, or a holder that is not tcpwatch.
    for claims in ({70: (812, "5")}, {70: (813, "4")}, {}):
        verdict = verify_claimed(listening, paths, claims)
        assert not verdict.trusted
        assert verdict.detail == (
            f"the daemon at {URL} did not show that it holds its listener (socket 70)"
        )
    impostor = ListeningSocket("ipv4", "127.0.0.1", 9477, 0, 71)
    listening = Listening(Verdict(True, "daemon uid 0"), URL, (impostor,))
    verdict = verify_claimed(listening, paths, {71: (813, "4")})
    assert not verdict.trusted and "is python3[813], not tcpwatch" in verdict.detail
    # An untrusted listener stays untrusted whatever the claims.
    refused = Listening(Verdict(False, "belongs to uid 65534"), URL, (ours,))
    assert verify_claimed(refused, paths, {70: (812, "4")}).detail == "belongs to uid 65534"


# -- reading the answer: bounded, and refused unless it is a plain complete 200 -------------------


@contextmanager
def fake_daemon(answer: bytes, hold: bool = False) -> Iterator[int]:
    """A one-connection server on loopback answering ``answer`` (or nothing, ``hold``)."""
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            if not hold:
                connection.sendall(answer)
            else:
                done.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        server.close()


def reply(body: bytes, status: str = "200 OK", length: int | None = None, extra: str = "") -> bytes:
    size = len(body) if length is None else length
    head = f"HTTP/1.1 {status}\r\nContent-Length: {size}\r\n{extra}Connection: close\r\n\r\n"
    return head.encode() + body


def test_http_get_reads_a_complete_answer() -> None:
    body = json.dumps(api.owners_document(daemon_state(), 1000)).encode()
    with fake_daemon(reply(body)) as port:
        assert json.loads(http_get("127.0.0.1", port, "/api/v1/owners", 2.0)) == json.loads(body)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (reply(b"Unauthorized", "401 Unauthorized"), "it answered 401, not 200"),
        (reply(b"{}", length=10), "an answer cut short"),
        (reply(b"{}", extra="Transfer-Encoding: chunked\r\n"), "a chunked answer"),
        (b"garbage", "it answered nothing, not 200"),
    ],
)
def test_http_get_refuses_what_serve_would_not_send(answer: bytes, message: str) -> None:
    with fake_daemon(answer) as port, pytest.raises(AnswerError, match=message):
        http_get("127.0.0.1", port, "/api/v1/owners", 2.0)


def test_http_get_gives_up_on_a_silent_daemon() -> None:
    with fake_daemon(b"", hold=True) as port, pytest.raises((AnswerError, TimeoutError)):
        http_get("127.0.0.1", port, "/api/v1/owners", 0.05)


def test_a_refused_connection_is_an_oserror() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        http_get("127.0.0.1", port, "/api/v1/owners", 0.05)


# -- what check says ---------------------------------------------------------------------------


def scope(origin: OwnersOrigin | None) -> Scope:
    return Scope(26, 0.0, owners=origin)


def test_checked_owners_says_where_they_came_from() -> None:
    found = Attribution({}, 3, True, confirmed=145)
    shot = snapshot()
    shots = [replace(shot, attribution=found)]
    used = OwnersOrigin(f"{URL} (daemon pid 812, uid 0)", 146)
    assert owners_of(shots, scope(used)) == {
        "daemon": f"{URL} (daemon pid 812, uid 0)",
        "offered": 146,
        "confirmed": 145,
        "processes_walked": 3,
        "daemon_note": None,
    }
    assert owners_line(shots, scope(used), verbose=False) == (
        f"owners   145 confirmed (one readlink each; 146 named) from the local daemon at {URL} "
        "(daemon pid 812, uid 0); 3 processes' descriptors read"
    )
    unused = OwnersOrigin(note=f"no daemon listens at {URL}\x1b[31m")
    assert owners_of(shots, scope(unused))["daemon"] is None  # type: ignore[index]
    assert owners_line(shots, scope(unused), verbose=False) is None  # quiet unless asked
    line = owners_line(shots, scope(unused), verbose=True)
    assert line == (
        "owners   from /proc/*/fd, 3 processes' descriptors read: "
        f"no daemon listens at {URL}\\x1b[31m"  # escaped: not a colour
    )
    assert owners_of(shots, scope(None)) is None


def test_the_owners_route_is_behind_the_same_auth_and_checks_its_query() -> None:
    from tcpwatch.http.webconfig import WebConfig

    from .test_web import HASH, PASSWORD, Holder, basic, get

    holder = Holder()
    app = holder.app(WebConfig(basic_auth_users={"prometheus": HASH}))
    login = basic("prometheus", PASSWORD)
    assert get(app, "/api/v1/owners").status == 401
    assert get(app, "/api/v1/owners", authorization=login).status == 503  # no poll yet
    holder.state = daemon_state()
    answer = get(app, "/api/v1/owners?limit=2", authorization=login)
    assert answer.status == 200 and answer.content_type == "application/json"
    assert parse_owners(json.loads(answer.body)) == {900: (40, "6"), 11: (41, "9")}
    bad = get(app, "/api/v1/owners?limit=0", authorization=login)
    assert bad.status == 400 and b"limit" in bad.body


def test_a_listen_address_without_a_usable_port_is_not_asked() -> None:
    from tcpwatch.cli_owners import ask_local_daemon
    from tcpwatch.config import Config

    for listen in (":99999", ":http"):
        hints = ask_local_daemon(replace(Config(), listen=listen))
        assert hints.known is None and "not a port to ask" in hints.origin.note


def test_a_daemon_whose_descriptors_we_may_not_read_is_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tcpwatch.top.local as local

    paths = build_proc(tmp_path, {812: ("tcpwatch", {4: "socket:[70]"})})
    ours = ListeningSocket("ipv4", "127.0.0.1", 9477, 0, 70)
    listening = Listening(Verdict(True, "daemon uid 0"), URL, (ours,))
    monkeypatch.setattr(local.os, "readlink", lambda path: (_ for _ in ()).throw(PermissionError))
    monkeypatch.setattr(local.os, "access", lambda path, mode: False)  # as a user, not root
    verdict = verify_claimed(listening, paths, {70: (812, "4")})
    assert not verdict.trusted
    assert verdict.detail.endswith("(its descriptors (pid 812) are not ours to read)")
