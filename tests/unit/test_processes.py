"""scan_owners over fixture procfs trees: fd symlinks like ``socket:[123]`` and comm files."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.model import Listener, ProcessRef, SocketTable
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.base import SourceContext
from tcpwatch.sources.fdwalk import socket_links, wanted_sockets_in
from tcpwatch.sources.processes import (
    NoProcesses,
    parse_comm,
    parse_socket_link,
    procfs_hides_processes,
    read_owners_source,
    scan_owners,
    wanted_inodes,
)
from tests.unit.snapshots import listener, snapshot, socket_table

# pid -> (comm, fd number -> link target); comm None leaves the comm file out.
Tree = Mapping[int, tuple[str | None, Mapping[int, str]]]


def build_proc(root: Path, tree: Tree) -> ProcPaths:
    for pid, (comm, fds) in tree.items():
        fd_dir = root / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        if comm is not None:
            (root / str(pid) / "comm").write_text(comm + "\n")
        for fd, target in fds.items():
            os.symlink(target, fd_dir / str(fd))
    (root / "self").symlink_to(str(min(tree, default=1)))  # not a pid: must be ignored
    return ProcPaths(root=str(root))


def test_parse_socket_link() -> None:
    assert parse_socket_link("socket:[48213]") == 48213
    assert parse_socket_link("pipe:[48220]") is None
    assert parse_socket_link("anon_inode:[eventpoll]") is None
    assert parse_socket_link("/dev/null") is None


@pytest.mark.parametrize("link", ["socket:[12a]", "socket:[]", "socket:[123", "socket:[-5]"])
def test_parse_socket_link_names_the_file_and_text_when_malformed(link: str) -> None:
    with pytest.raises(ValueError, match=r"/proc/7/fd/3: malformed socket link") as error:
        parse_socket_link(link, "/proc/7/fd/3")
    assert repr(link) in str(error.value)


def test_parse_comm() -> None:
    assert parse_comm(b"nginx\n") == "nginx"
    assert parse_comm(b"tw-holder-proce\n") == "tw-holder-proce"
    assert parse_comm(b"bad\xffname\n") == "bad\ufffdname"


def test_finds_the_owner_of_each_wanted_socket_only(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {
            10: ("nginx", {0: "/dev/null", 3: "socket:[101]", 4: "pipe:[900]", 5: "socket:[102]"}),
            20: ("postgres", {3: "socket:[202]", 4: "anon_inode:[eventpoll]"}),
            30: ("sshd", {3: "socket:[303]"}),
        },
    )
    result = scan_owners(paths, frozenset({101, 202, 303}))
    assert result.owners == {
        101: ProcessRef(10, "nginx"),
        202: ProcessRef(20, "postgres"),
        303: ProcessRef(30, "sshd"),
    }
    assert result.owner(102) is None  # open, but not asked for
    assert result.complete
    assert result.processes_scanned == 3


def test_a_shared_socket_belongs_to_the_lowest_pid(tmp_path: Path) -> None:
    # Created highest pid first so directory order does not hand the answer over.
    paths = build_proc(
        tmp_path,
        {
            900: ("worker", {3: "socket:[555]"}),
            77: ("worker", {3: "socket:[555]"}),
            12: ("master", {3: "socket:[555]", 4: "socket:[556]"}),
        },
    )
    result = scan_owners(paths, frozenset({555}))
    assert result.owners == {555: ProcessRef(12, "master")}


def test_stops_once_every_wanted_socket_is_found(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {
            5: ("app", {3: "socket:[1]", 4: "socket:[2]"}),
            6: ("later", {3: "socket:[3]"}),
            7: ("later", {3: "socket:[4]"}),
        },
    )
    result = scan_owners(paths, frozenset({1, 2}))
    assert result.processes_scanned == 1
    assert result.complete
    assert set(result.owners) == {1, 2}


def test_walks_everything_when_a_socket_has_no_owner(tmp_path: Path) -> None:
    paths = build_proc(tmp_path, {5: ("app", {3: "socket:[1]"}), 6: ("other", {3: "socket:[3]"})})
    result = scan_owners(paths, frozenset({1, 99}))
    assert result.owners == {1: ProcessRef(5, "app")}
    assert result.processes_scanned == 2
    assert result.complete  # every process read: 99 is owned by nobody


def test_the_source_records_which_owners_it_looked_for(tmp_path: Path) -> None:
    """check's narrowed lookup (owner_inodes) and serve's every candidate: the attribution says
    which sockets were looked for (None: every candidate), so a listener never looked for is not
    counted as missed."""
    paths = build_proc(tmp_path, {5: ("nginx", {3: "socket:[5003]"})})
    table = socket_table([listener(80, inode=5003), listener(443, inode=5004)])
    polled = [snapshot(sockets=table)]
    narrowed = SourceContext(paths, CollectSettings(), "", 0, 0.0, owner_inodes=frozenset({5003}))
    found = read_owners_source.read(narrowed, polled)
    assert found.owners == {5003: ProcessRef(5, "nginx")}
    assert found.looked_for == {5003}
    every = read_owners_source.read(SourceContext(paths, CollectSettings(), "", 0, 0.0), polled)
    assert every.looked_for is None  # every candidate: both listeners
    assert every.missed(5004) and not every.missed(5003) and not found.missed(5004)


def test_nothing_wanted_means_no_scan(tmp_path: Path) -> None:
    missing_root = ProcPaths(root=str(tmp_path / "does-not-exist"))
    for wanted in (frozenset[int](), frozenset({0})):  # inode 0: TIME_WAIT, request sockets
        result = scan_owners(missing_root, wanted)
        assert result.owners == {}
        assert result.processes_scanned == 0
        assert result.complete


@pytest.mark.parametrize("make_root", ["missing", "empty", "no pid entries"])
def test_a_procfs_listing_no_process_is_an_error_not_a_complete_scan(
    tmp_path: Path, make_root: str
) -> None:
    # --path.procfs pointed at the wrong directory: every socket would look ownerless and the
    # source "complete"; the source must be down instead (issue 16 item 5).
    root = tmp_path / "proc"
    if make_root != "missing":
        root.mkdir()
    if make_root == "no pid entries":
        (root / "net").mkdir()
        (root / "self").symlink_to("1")
    with pytest.raises(NoProcesses, match=r"lists no process"):
        scan_owners(ProcPaths(root=str(root)), frozenset({1}))


def test_inode_zero_is_ignored_and_does_not_prevent_the_early_exit(tmp_path: Path) -> None:
    paths = build_proc(tmp_path, {5: ("app", {3: "socket:[1]"}), 6: ("other", {3: "socket:[3]"})})
    result = scan_owners(paths, frozenset({0, 1}))
    assert result.owners == {1: ProcessRef(5, "app")}
    assert result.processes_scanned == 1


def test_processes_that_exit_mid_scan_are_skipped(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {
            5: (None, {3: "socket:[1]"}),  # exited between its fd read and its name read
            6: ("app", {3: "socket:[2]"}),
            8: ("app", {3: "socket:[3]"}),
        },
    )
    (tmp_path / "7").mkdir()  # listed, but its fd directory is already gone
    result = scan_owners(paths, frozenset({1, 2, 3}))
    assert result.owners == {2: ProcessRef(6, "app"), 3: ProcessRef(8, "app")}
    assert result.processes_scanned == 3  # 5, 6 and 8 had fd tables; 7 had none
    assert result.complete  # an exited process hides nothing


@pytest.fixture
def deny_fd_dir(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """Deny one fd directory as the kernel does for a process we may not inspect.

    ``"open"``: the directory itself is refused (another user's process, without privileges).
    ``"readlink"``: it lists, but every link is refused (the ptrace access check fails).
    Root bypasses file modes on a fixture tree, so the kernel's answer is reproduced here.
    """
    real_open, real_readlink = os.open, os.readlink

    def deny(path: str, how: str) -> None:
        def fake_open(name: str, flags: int, *args: int, **kwargs: int) -> int:
            if str(name) == path and how == "open":
                raise PermissionError(13, "Permission denied", name)
            return real_open(name, flags, *args, **kwargs)

        def fake_readlink(name: str, *, dir_fd: int | None = None) -> str:
            denied = dir_fd is not None and real_readlink(f"/proc/self/fd/{dir_fd}") == path
            if how == "readlink" and denied:
                raise PermissionError(13, "Permission denied", name)
            return real_readlink(name, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "readlink", fake_readlink)

    return deny


@pytest.mark.parametrize("how", ["open", "readlink"])
def test_denied_processes_are_skipped_and_leave_the_scan_incomplete(
    tmp_path: Path, deny_fd_dir: Callable[[str, str], None], how: str
) -> None:
    paths = build_proc(tmp_path, {5: ("secret", {3: "socket:[1]"}), 6: ("app", {3: "socket:[2]"})})
    deny_fd_dir(paths.pid(5, "fd"), how)
    result = scan_owners(paths, frozenset({1, 2}))
    assert result.owners == {2: ProcessRef(6, "app")}
    assert result.processes_scanned == 1
    assert not result.complete  # socket 1 may belong to the process we could not read


def test_a_denied_process_does_not_matter_once_everything_is_found(
    tmp_path: Path, deny_fd_dir: Callable[[str, str], None]
) -> None:
    paths = build_proc(tmp_path, {5: ("secret", {3: "socket:[1]"}), 6: ("app", {3: "socket:[2]"})})
    deny_fd_dir(paths.pid(5, "fd"), "open")
    result = scan_owners(paths, frozenset({2}))
    assert result.owners == {2: ProcessRef(6, "app")}
    assert result.complete


def fake_clock(readings: list[float]) -> Callable[[], float]:
    values: Iterator[float] = itertools.chain(readings, itertools.repeat(readings[-1]))
    return lambda: next(values)


def test_stops_at_the_deadline(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {pid: ("app", {3: f"socket:[{pid}]"}) for pid in (5, 6, 7, 8)},
    )
    # start, then one reading before each process: pids 5 and 6 fit in 1 s, 7 does not.
    clock = fake_clock([100.0, 100.0, 100.5, 101.0])
    result = scan_owners(paths, frozenset({5, 6, 7, 8}), deadline_seconds=1.0, clock=clock)
    assert result.owners == {5: ProcessRef(5, "app"), 6: ProcessRef(6, "app")}
    assert result.processes_scanned == 2
    assert not result.complete


def test_a_zero_deadline_scans_nothing(tmp_path: Path) -> None:
    paths = build_proc(tmp_path, {5: ("app", {3: "socket:[1]"})})
    result = scan_owners(paths, frozenset({1}), deadline_seconds=0.0)
    assert result.owners == {}
    assert result.processes_scanned == 0
    assert not result.complete


def test_a_malformed_socket_link_is_no_wanted_socket(tmp_path: Path) -> None:
    # Links are matched whole against socket:[INODE]: one the kernel never writes matches none,
    # and a wanted socket further on is still found.
    paths = build_proc(
        tmp_path, {5: ("app", {3: "socket:[oops]", 4: "socket:[1 ]", 6: "socket:[1]"})}
    )
    result = scan_owners(paths, frozenset({1}))
    assert result.locations == {1: (5, "6")}


def _procfs_with(tmp_path: Path, proc_options: str, cap_eff: str) -> ProcPaths:
    root = tmp_path / "proc"
    (root / "self").mkdir(parents=True)
    (root / "self" / "mountinfo").write_text(
        "22 1 0:5 / / rw - ext4 /dev/vda rw\n"
        f"23 22 0:21 / {os.path.realpath(root)} rw,nosuid - proc proc {proc_options}\n"
    )
    (root / "self" / "status").write_text(f"Name:\ttcpwatch\nCapEff:\t{cap_eff}\n")
    return ProcPaths(root=str(root))


def test_hidepid_without_ptrace_capability_means_processes_are_hidden(tmp_path: Path) -> None:

    assert procfs_hides_processes(_procfs_with(tmp_path, "rw,hidepid=invisible", "0"))


def test_hidepid_with_ptrace_capability_or_plain_procfs_hides_nothing(tmp_path: Path) -> None:

    with_ptrace = f"{1 << 19:016x}"
    assert not procfs_hides_processes(_procfs_with(tmp_path / "a", "rw,hidepid=2", with_ptrace))
    assert not procfs_hides_processes(_procfs_with(tmp_path / "b", "rw", "0"))
    assert not procfs_hides_processes(_procfs_with(tmp_path / "c", "rw,hidepid=0", "0"))


def test_next_scan_confirms_known_owners_without_walking(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {
            10: ("nginx", {3: "socket:[101]"}),
            20: ("app", {7: "socket:[202]"}),
        },
    )
    first = scan_owners(paths, frozenset({101, 202}))
    assert first.locations == {101: (10, "3"), 202: (20, "7")}
    assert first.confirmed == 0
    (tmp_path / "20" / "comm").write_text("app-renamed\n")
    second = scan_owners(paths, frozenset({101, 202}), known=first)
    assert second.owners == {101: ProcessRef(10, "nginx"), 202: ProcessRef(20, "app-renamed")}
    assert (second.confirmed, second.processes_scanned, second.complete) == (2, 0, True)


def test_a_moved_or_closed_socket_falls_back_to_the_walk(tmp_path: Path) -> None:
    paths = build_proc(
        tmp_path,
        {
            10: ("nginx", {3: "socket:[101]"}),
            20: ("app", {7: "socket:[202]"}),
        },
    )
    first = scan_owners(paths, frozenset({101, 202}))
    # fd 7 now holds another socket, and 202 was passed to a new process 30 at fd 4.
    os.remove(tmp_path / "20" / "fd" / "7")
    os.symlink("socket:[999]", tmp_path / "20" / "fd" / "7")
    (tmp_path / "30" / "fd").mkdir(parents=True)
    (tmp_path / "30" / "comm").write_text("worker\n")
    os.symlink("socket:[202]", tmp_path / "30" / "fd" / "4")
    second = scan_owners(paths, frozenset({101, 202}), known=first)
    assert second.owners == {101: ProcessRef(10, "nginx"), 202: ProcessRef(30, "worker")}
    assert second.confirmed == 1
    assert second.locations[202] == (30, "4")


def test_confirming_reads_each_process_fd_directory_once_and_skips_an_exited_one(
    tmp_path: Path,
) -> None:
    paths = build_proc(
        tmp_path,
        {
            10: ("nginx", {3: "socket:[101]", 4: "socket:[102]", 5: "socket:[103]"}),
            20: ("app", {7: "socket:[202]"}),
        },
    )
    first = scan_owners(paths, frozenset({101, 102, 103, 202}))
    # Process 20 exited; process 10 closed fd 4 and holds another socket at 5.
    for link in (tmp_path / "20" / "fd").iterdir():
        link.unlink()
    (tmp_path / "20" / "fd").rmdir()
    os.remove(tmp_path / "10" / "fd" / "4")
    os.remove(tmp_path / "10" / "fd" / "5")
    os.symlink("socket:[999]", tmp_path / "10" / "fd" / "5")
    before = len(os.listdir("/proc/self/fd"))
    second = scan_owners(paths, frozenset({101, 102, 103, 202}), known=first)
    assert second.owners == {101: ProcessRef(10, "nginx")}
    assert second.confirmed == 1
    assert len(os.listdir("/proc/self/fd")) == before  # every directory opened was closed


def test_processes_of_the_sockets_users_are_read_first(tmp_path: Path) -> None:
    # Process 5 holds thousands of fds, none wanted, as another user; 9 (the sockets' user)
    # holds the wanted one. Ascending pids would read 5's table whole; the uid order does not.
    paths = build_proc(
        tmp_path,
        {
            5: ("big", {fd: f"socket:[{1000 + fd}]" for fd in range(3, 400)}),
            9: ("app", {3: "socket:[1]", 4: "socket:[2]", 5: "socket:[3]"}),
        },
    )
    os.chown(tmp_path / "9", 1000, 1000)
    attribution = scan_owners(paths, frozenset({1, 2}), uids=frozenset({1000}))
    assert attribution.owner(1) == attribution.owner(2) == ProcessRef(9, "app")
    assert attribution.processes_scanned == 1 and attribution.complete
    # Without the uid the ascending order reads 5 first, and still finds the same owners.
    ascending = scan_owners(paths, frozenset({1, 2}))
    assert ascending.processes_scanned == 2
    assert ascending.owners == attribution.owners
    # A uid nobody runs as changes the order of nothing.
    assert scan_owners(paths, frozenset({1, 2}), uids=frozenset({4242})).processes_scanned == 2


def test_a_duplicated_socket_does_not_end_the_read_early(tmp_path: Path) -> None:
    # The read of a process stops once it found every wanted socket: two fds of one socket
    # count once.
    paths = build_proc(tmp_path, {5: ("app", {3: "socket:[7]", 4: "socket:[7]", 5: "socket:[9]"})})
    found = wanted_sockets_in(paths.pid(5, "fd"), socket_links({7, 9}))
    assert {inode for inode, _ in found} == {7, 9}


def test_serve_looks_for_owners_of_lasting_sockets_only() -> None:
    # A CLOSE_WAIT the previous poll did not see yet is churn until the next poll: not wanted.
    table = SocketTable(
        counts={},
        listeners=(Listener("ipv4", "0.0.0.0", 80, 0, 128, syn_recv=0, inode=11),),
        ephemeral_use=(),
        syn_sent=(),
        self_connects=(),
        inodes_by_state={"close_wait": frozenset({21, 22})},
        established_method="derived",
        messages=0,
    )
    assert wanted_inodes(table) == {11, 21, 22}  # check, or serve's first poll
    assert wanted_inodes(table, lasting=frozenset({22, 99})) == {11, 22}
    assert wanted_inodes(table, lasting=frozenset()) == {11}  # listeners always
