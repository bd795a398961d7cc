"""Naming a network namespace from fixture trees.

Real nsfs files cannot be made in a fixture, but what the code compares is only st_ino, so hard
links stand in: every hard link of a file has its inode, as every handle on a namespace has the
namespace's inode.
"""

from __future__ import annotations

import os
from pathlib import Path

from tcpwatch.paths import ProcPaths
from tcpwatch.sources.netns import (
    NET_NS_INIT_INO,
    current_netns_inode,
    ip_netns_name,
    netns_name,
)


class Fixture:
    """A procfs root and a /run/netns directory under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.proc = tmp_path / "proc"
        self.run_netns = tmp_path / "run" / "netns"
        self.store = tmp_path / "namespaces"  # one file per namespace, linked from everywhere
        for directory in (self.proc, self.run_netns, self.store):
            directory.mkdir(parents=True)
        self.paths = ProcPaths(root=str(self.proc))

    def namespace(self, label: str) -> int:
        """A new 'namespace': its inode."""
        path = self.store / label
        path.write_bytes(b"")
        return path.stat().st_ino

    def member(self, pid: int | str, label: str) -> None:
        ns_dir = self.proc / str(pid) / "ns"
        ns_dir.mkdir(parents=True)
        os.link(self.store / label, ns_dir / "net")

    def bind(self, name: str, label: str) -> None:
        os.link(self.store / label, self.run_netns / name)

    def name_of(self, inode: int) -> str:
        return netns_name(self.paths, inode, run_netns_dir=str(self.run_netns))


def test_current_netns_inode_reads_self(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    inode = fixture.namespace("mine")
    fixture.member("self", "mine")
    assert current_netns_inode(fixture.paths) == inode


def test_the_namespace_of_pid_1_is_host(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    init = fixture.namespace("init")
    fixture.member(1, "init")
    fixture.member(300, "init")
    fixture.bind("also-init", "init")  # pid 1 wins over an ip netns name
    assert fixture.name_of(init) == "host"


def test_the_initial_namespace_inode_is_host_even_when_pid_1_is_unreadable(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    (fixture.proc / "1").mkdir()  # no ns/net we may read
    assert fixture.name_of(NET_NS_INIT_INO) == "host"


def test_an_ip_netns_name(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    fixture.namespace("init")
    fixture.member(1, "init")
    blue = fixture.namespace("blue")
    fixture.member(40, "blue")
    fixture.bind("blue", "blue")
    fixture.namespace("red")
    fixture.bind("red", "red")
    assert fixture.name_of(blue) == "blue"  # not ns:<inode>
    assert ip_netns_name(blue, str(fixture.run_netns)) == "blue"


def test_two_ip_netns_names_for_one_namespace_give_the_first_alphabetically(
    tmp_path: Path,
) -> None:
    fixture = Fixture(tmp_path)
    shared = fixture.namespace("shared")
    fixture.bind("zulu", "shared")
    fixture.bind("alpha", "shared")
    assert fixture.name_of(shared) == "alpha"


def test_an_unnamed_namespace_is_named_by_its_inode_whoever_lives_in_it(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    fixture.namespace("init")
    fixture.member(1, "init")
    container = fixture.namespace("container")
    for pid in (4711, 9000, 1033, 2048, 6100, 3333, 812, 5120, 7777, 1500):
        fixture.member(pid, "container")
    fixture.member(90, "init")
    assert fixture.name_of(container) == f"ns:{container}"
    # Its lowest process exits (it restarts under a new pid): the name stays.
    for entry in (fixture.proc / "812" / "ns").iterdir():
        entry.unlink()
    fixture.member(9100, "container")
    assert fixture.name_of(container) == f"ns:{container}"


def test_unreadable_entries_are_skipped(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    container = fixture.namespace("container")
    (fixture.proc / "1").mkdir()  # pid 1: ns not readable
    (fixture.proc / "2" / "ns").mkdir(parents=True)  # exited: ns/net gone
    (fixture.run_netns / "stale").symlink_to(tmp_path / "nowhere")  # dangling entry
    fixture.member(7, "container")
    assert fixture.name_of(container) == f"ns:{container}"


def test_a_missing_run_netns_directory_is_no_error(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    container = fixture.namespace("container")
    fixture.member(7, "container")
    name = netns_name(fixture.paths, container, run_netns_dir=str(tmp_path / "absent"))
    assert name == f"ns:{container}"


def test_a_namespace_nobody_we_can_see_is_in_is_named_by_its_inode(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path)
    fixture.namespace("init")
    fixture.member(1, "init")
    held_by_a_file_descriptor_only = fixture.namespace("orphan")
    assert fixture.name_of(held_by_a_file_descriptor_only) == (
        f"ns:{held_by_a_file_descriptor_only}"
    )
