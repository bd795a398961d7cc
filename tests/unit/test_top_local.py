"""tcpwatch/top/local.py: which listener `top` may read unasked, on fixtures (a fake /proc)."""

from __future__ import annotations

from pathlib import Path

from tcpwatch.paths import ProcPaths
from tcpwatch.sources.lookup import Holder, ListeningSocket, is_tcpwatch_command, unit_uids
from tcpwatch.top.local import judge, reachable

URL = "http://127.0.0.1:9477"


def sock(uid: int, address: str = "127.0.0.1", inode: int = 7) -> ListeningSocket:
    return ListeningSocket("ipv6" if ":" in address else "ipv4", address, 9477, uid, inode)


def test_a_connection_may_reach_the_address_itself_and_the_wildcards() -> None:
    listeners = [sock(0, "127.0.0.1"), sock(1, "0.0.0.0"), sock(2, "::"), sock(3, "10.0.0.1")]
    assert [s.uid for s in reachable(listeners, "127.0.0.1")] == [0, 1, 2]
    assert [s.uid for s in reachable([*listeners, sock(4, "::1")], "::1")] == [2, 4]


def test_root_you_or_the_unit_user_is_trusted_and_anyone_else_is_not() -> None:
    daemon = {7: Holder(812, "tcpwatch", True)}
    assert judge([sock(0)], 1000, set(), daemon, URL).detail == "daemon pid 812, uid 0"
    assert judge([sock(1000)], 1000, set(), {}, URL).detail == "daemon uid 1000"
    assert judge([sock(61234)], 0, {61234}, daemon, URL).trusted
    refused = judge([sock(65534)], 0, {61234}, {}, URL)
    assert not refused.trusted and "belongs to uid 65534" in refused.detail
    assert f"--from {URL} reads it anyway" in refused.detail
    # One stranger among reuseport sockets or a wildcard is enough to refuse.
    assert not judge([sock(0), sock(65534, "0.0.0.0", 8)], 0, set(), daemon, URL).trusted
    assert judge([], 0, set(), {}, URL).detail == f"no daemon listens at {URL}"


def test_a_trusted_user_running_something_else_is_not_a_daemon() -> None:
    other = judge([sock(0)], 0, set(), {7: Holder(99, "python3", False)}, URL)
    assert not other.trusted and "is python3[99], not tcpwatch" in other.detail


def test_tcpwatch_is_recognised_however_it_was_started() -> None:
    assert is_tcpwatch_command([b"/usr/local/bin/tcpwatch", b"serve", b""])
    assert is_tcpwatch_command([b"/usr/bin/python3", b"/usr/bin/tcpwatch", b"serve", b""])
    assert is_tcpwatch_command([b"python", b"-m", b"tcpwatch", b"serve", b""])
    assert not is_tcpwatch_command([b"python3", b"-c", b"import tcpwatch", b""])
    assert not is_tcpwatch_command([b"/usr/bin/python3", b"-m", b"http.server", b"9477", b""])


def test_the_unit_users_are_read_from_the_cgroups(tmp_path: Path) -> None:
    processes = {
        10: ("0::/system.slice/tcpwatch.service\n", 61234),
        11: ("12:name=systemd:/system.slice/tcpwatch.service\n0::/\n", 61235),  # cgroup v1
        12: ("0::/user.slice/user-1000.slice/tcpwatch.service.scope\n", 1000),
        # Any user may start a user unit of that name: only the system's counts.
        13: ("0::/user.slice/user-1001.slice/user@1001.service/app.slice/tcpwatch.service\n", 1001),
        14: ("0::/system.slice/tcpwatch.service/x\n", 1002),  # a sub-group is not the unit
        15: ("4:memory:/system.slice/tcpwatch.service\n0::/user.slice\n", 1003),  # not systemd's
    }
    for pid, (cgroup, uid) in processes.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(cgroup)
        (tmp_path / str(pid) / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (tmp_path / "16").mkdir()  # gone between the listing and the read
    assert unit_uids(ProcPaths(str(tmp_path))) == {61234, 61235}
