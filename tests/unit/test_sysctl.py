"""Sysctl parsers and reader, fed the real values copied into tests/fixtures/proc/sys."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.model import MULTI_FIELD_SUFFIXES, Sysctls
from tcpwatch.paths import ProcPaths
from tcpwatch.snapshot import take_snapshot
from tcpwatch.sources.base import SourceContext
from tcpwatch.sources.procnet import ProcParseError
from tcpwatch.sources.registry import registered_sources
from tcpwatch.sources.sysctl import (
    RESERVED_PORTS,
    SYSCTLS,
    NoSysctls,
    parse_reserved_ports,
    parse_sysctl,
    read_sysctl_files,
    read_sysctl_source,
    read_sysctls,
)

SYSCTL = next(s for s in registered_sources() if s.name == "sysctl")
FIXTURE = ProcPaths(root=str(Path(__file__).resolve().parent.parent / "fixtures" / "proc"))

EXPECTED_NAMES = {
    "net.core.somaxconn",
    "net.core.netdev_max_backlog",
    *(
        f"net.ipv4.{name}"
        for name in [
            "tcp_max_syn_backlog",
            "tcp_ehash_entries",
            "tcp_child_ehash_entries",
            "tcp_syncookies",
            "tcp_abort_on_overflow",
            "tcp_fin_timeout",
            "tcp_tw_reuse",
            "tcp_tw_recycle",
            "tcp_max_tw_buckets",
            "tcp_max_orphans",
            "ip_local_port_range",
            "tcp_keepalive_time",
            "tcp_keepalive_intvl",
            "tcp_keepalive_probes",
            "tcp_syn_retries",
            "tcp_synack_retries",
            "tcp_mem",
            "tcp_rmem",
            "tcp_wmem",
            "ip_unprivileged_port_start",
        ]
    ),
}


def test_sysctl_names() -> None:
    assert len(SYSCTLS) == len(set(SYSCTLS)) == 22
    assert set(SYSCTLS) == EXPECTED_NAMES
    assert RESERVED_PORTS not in SYSCTLS


def test_multi_field_suffixes() -> None:
    assert dict(MULTI_FIELD_SUFFIXES) == {
        "net.ipv4.ip_local_port_range": ("min", "max"),
        "net.ipv4.tcp_mem": ("min", "pressure", "max"),
        "net.ipv4.tcp_rmem": ("min", "default", "max"),
        "net.ipv4.tcp_wmem": ("min", "default", "max"),
    }
    assert set(MULTI_FIELD_SUFFIXES) <= set(SYSCTLS)
    with pytest.raises(TypeError):
        MULTI_FIELD_SUFFIXES["net.core.somaxconn"] = ("x",)  # type: ignore[index]


def test_named_fields_name_each_field_and_leave_out_a_wrong_count() -> None:
    sysctls = Sysctls(
        {
            "net.ipv4.tcp_mem": (1, 2, 3),
            "net.core.somaxconn": (4096,),
            "net.ipv4.ip_local_port_range": (1, 2, 3),  # not two fields: left out
            "net.ipv4.tcp_fin_timeout": (60, 61),  # one-field sysctl with two: left out
        }
    )
    assert sysctls.named_fields() == (
        ("net.core.somaxconn", 4096),
        ("net.ipv4.tcp_mem.min", 1),
        ("net.ipv4.tcp_mem.pressure", 2),
        ("net.ipv4.tcp_mem.max", 3),
    )


def test_read_fixture() -> None:
    sysctls = read_sysctls(FIXTURE)
    # This kernel (6.18) has no tcp_tw_recycle (removed in 4.12): absent, not an error.
    assert set(sysctls.values) == EXPECTED_NAMES - {"net.ipv4.tcp_tw_recycle"}
    assert sysctls.values["net.core.somaxconn"] == (4096,)
    assert sysctls.values["net.ipv4.tcp_syncookies"] == (1,)
    assert sysctls.values["net.ipv4.tcp_tw_reuse"] == (2,)
    assert sysctls.values["net.ipv4.ip_local_port_range"] == (32768, 60999)
    assert sysctls.values["net.ipv4.tcp_mem"] == (287898, 383866, 575796)
    assert sysctls.values["net.ipv4.tcp_rmem"] == (4096, 131072, 33554432)
    assert sysctls.values["net.ipv4.tcp_wmem"] == (4096, 16384, 4194304)
    assert sysctls.reserved_ports == ()
    assert sysctls.port_range == (32768, 60999)
    assert sysctls.get("net.ipv4.tcp_tw_recycle") is None
    assert sysctls.get("net.ipv4.tcp_mem", 1) == 383866
    for name, suffixes in MULTI_FIELD_SUFFIXES.items():
        assert len(sysctls.values[name]) == len(suffixes)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("net.ipv4.ip_local_port_range", "32768\t60999\n", (32768, 60999)),
        ("net.core.somaxconn", "4096\n", (4096,)),
        ("net.core.somaxconn", "  -1  ", (-1,)),
        ("net.ipv4.tcp_mem", "1 2 3\n", (1, 2, 3)),
    ],
)
def test_parse_sysctl(name: str, text: str, expected: tuple[int, ...]) -> None:
    assert parse_sysctl(name, text, "p") == expected


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "net.ipv4.ip_local_port_range",
            "32768\n",
            'p:1: expected 2 integers for net.ipv4.ip_local_port_range in "32768"',
        ),
        ("net.core.somaxconn", "\n", "p:1: expected 1 integer for net.core.somaxconn"),
        (
            "net.core.somaxconn",
            "12 13\n",
            'p:1: expected 1 integer for net.core.somaxconn in "12 13"',
        ),
        ("net.core.somaxconn", "lots\n", 'p:1: expected integers for net.core.somaxconn in "lots"'),
        ("net.ipv4.tcp_rmem", "1 2 x\n", 'p:1: expected integers for net.ipv4.tcp_rmem in "1 2 x"'),
    ],
)
def test_malformed_sysctl(name: str, text: str, message: str) -> None:
    with pytest.raises(ProcParseError) as caught:
        parse_sysctl(name, text, "p")
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080,9000-9010\n", ((8080, 8080), (9000, 9010))),
        ("", ()),
        ("\n", ()),
        ("0-65535\n", ((0, 65535),)),
        ("40000\n", ((40000, 40000),)),
    ],
)
def test_parse_reserved_ports(text: str, expected: tuple[tuple[int, int], ...]) -> None:
    assert parse_reserved_ports(text, "p") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80-\n", 'p:1: expected a port or range, got "80-" in "80-"'),
        ("8080,,9000\n", 'p:1: expected a port or range, got "" in "8080,,9000"'),
        ("http\n", 'p:1: expected a port or range, got "http" in "http"'),
        ("9010-9000\n", 'p:1: port range "9010-9000" out of order or bounds in "9010-9000"'),
        ("70000\n", 'p:1: port range "70000" out of order or bounds in "70000"'),
    ],
)
def test_malformed_reserved_ports(text: str, message: str) -> None:
    with pytest.raises(ProcParseError) as caught:
        parse_reserved_ports(text, "p")
    assert str(caught.value) == message


def write_sysctl(root: Path, dotted: str, text: str) -> None:
    path = root / "sys" / Path(*dotted.split("."))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_read_sysctls_partial_tree(tmp_path: Path) -> None:
    write_sysctl(tmp_path, "net.core.somaxconn", "128\n")
    write_sysctl(tmp_path, "net.ipv4.ip_local_port_range", "40000\t40999\n")
    write_sysctl(tmp_path, RESERVED_PORTS, "40100,40200-40299\n")
    sysctls = read_sysctls(ProcPaths(root=str(tmp_path)))
    assert dict(sysctls.values) == {
        "net.core.somaxconn": (128,),
        "net.ipv4.ip_local_port_range": (40000, 40999),
    }
    assert sysctls.reserved_ports == ((40100, 40100), (40200, 40299))
    assert sysctls.port_reserved(40250)
    assert not sysctls.port_reserved(40101)


def test_read_sysctls_empty_tree(tmp_path: Path) -> None:
    sysctls = read_sysctls(ProcPaths(root=str(tmp_path)))
    assert dict(sysctls.values) == {}
    assert sysctls.reserved_ports == ()
    assert sysctls.reserved_ports_known  # an absent file: the kernel has no reservations


def test_a_malformed_value_drops_only_its_own_field(tmp_path: Path) -> None:
    write_sysctl(tmp_path, "net.core.somaxconn", "4096\n")
    write_sysctl(tmp_path, "net.ipv4.tcp_fin_timeout", "sixty\n")
    write_sysctl(tmp_path, "net.ipv4.tcp_mem", "1 2\n")
    paths = ProcPaths(root=str(tmp_path))
    read = read_sysctl_files(paths)
    assert dict(read.sysctls.values) == {"net.core.somaxconn": (4096,)}
    assert read.skipped == (
        f"{paths.sysctl('net.ipv4.tcp_fin_timeout')}:1: expected integers for "
        'net.ipv4.tcp_fin_timeout in "sixty"',
        f'{paths.sysctl("net.ipv4.tcp_mem")}:1: expected 3 integers for net.ipv4.tcp_mem in "1 2"',
    )


def test_malformed_reserved_ports_drop_only_the_reservations(tmp_path: Path) -> None:
    write_sysctl(tmp_path, "net.core.somaxconn", "4096\n")
    write_sysctl(tmp_path, RESERVED_PORTS, "1-2-3\n")
    paths = ProcPaths(root=str(tmp_path))
    read = read_sysctl_files(paths)
    assert read.sysctls.values == {"net.core.somaxconn": (4096,)}
    assert read.sysctls.reserved_ports == ()
    assert not read.sysctls.reserved_ports_known  # unknown, not "none reserved"
    (note,) = read.skipped
    assert note.startswith(f"{paths.sysctl(RESERVED_PORTS)}:1: expected a port or range")


def test_an_unreadable_file_is_skipped_and_named(tmp_path: Path) -> None:
    # A directory where a value file should be: not "absent", so it is named, not hidden.
    write_sysctl(tmp_path, "net.ipv4.tcp_syncookies", "1\n")
    (tmp_path / "sys" / "net" / "core" / "somaxconn").mkdir(parents=True)
    read = read_sysctl_files(ProcPaths(root=str(tmp_path)))
    assert read.sysctls.values == {"net.ipv4.tcp_syncookies": (1,)}
    (note,) = read.skipped
    assert "somaxconn" in note and "directory" in note.lower()


@pytest.mark.parametrize("text", ["60999 32768\n", "1 70000\n", "-1 100\n"])
def test_a_port_range_that_is_no_range_is_malformed(text: str) -> None:
    with pytest.raises(ProcParseError, match="expected two ports, the lower first"):
        parse_sysctl("net.ipv4.ip_local_port_range", text, "p")


def _context(root: Path) -> SourceContext:
    return SourceContext(ProcPaths(root=str(root)), CollectSettings(), "x", 0, 0.0)


def test_the_source_is_degraded_not_down_when_some_fields_are_bad(tmp_path: Path) -> None:
    write_sysctl(tmp_path, "net.core.somaxconn", "4096\n")
    write_sysctl(tmp_path, "net.ipv4.tcp_fin_timeout", "sixty\n")
    snapshot = take_snapshot(
        CollectSettings(), ProcPaths(root=str(tmp_path)), "x", sources=[SYSCTL]
    )
    (status,) = snapshot.sources
    assert status.ok and status.error is None
    assert len(status.skipped) == 1 and "tcp_fin_timeout" in status.skipped[0]
    assert snapshot.sysctls is not None
    assert snapshot.sysctls.values == {"net.core.somaxconn": (4096,)}


def test_the_source_fails_when_procfs_has_no_sysctls(tmp_path: Path) -> None:
    snapshot = take_snapshot(
        CollectSettings(), ProcPaths(root=str(tmp_path)), "x", sources=[SYSCTL]
    )
    (status,) = snapshot.sources
    assert not status.ok and snapshot.sysctls is None
    assert status.error == f"no TCP sysctl under {tmp_path}/sys/net (is it procfs?)"
    with pytest.raises(NoSysctls):
        read_sysctl_source.read(_context(tmp_path), [snapshot])


def test_the_source_fails_when_no_file_is_usable(tmp_path: Path) -> None:
    write_sysctl(tmp_path, "net.core.somaxconn", "many\n")
    snapshot = take_snapshot(
        CollectSettings(), ProcPaths(root=str(tmp_path)), "x", sources=[SYSCTL]
    )
    (status,) = snapshot.sources
    assert not status.ok and status.skipped == ()
    assert status.error is not None and status.error.startswith("no sysctl file was usable")


def test_every_sysctl_a_rule_reads_is_collected() -> None:
    from tcpwatch.rules import SYSCTLS_USED
    from tcpwatch.sources.sysctl import RESERVED_PORTS, SYSCTLS

    assert set(SYSCTLS_USED) <= {*SYSCTLS, RESERVED_PORTS}


def test_names_the_rules_declare_are_read_and_reserved_ports_keep_their_parser(
    tmp_path: Path,
) -> None:
    from tcpwatch.rules import SYSCTLS_USED

    ipv4 = tmp_path / "sys" / "net" / "ipv4"
    ipv4.mkdir(parents=True)
    (ipv4 / "ip_local_reserved_ports").write_text("8080,9000-9010\n")
    (ipv4 / "tcp_syncookies").write_text("1\n")
    sysctls = read_sysctls(ProcPaths(root=str(tmp_path)), SYSCTLS_USED)
    assert "net.ipv4.ip_local_reserved_ports" in SYSCTLS_USED
    assert sysctls.reserved_ports == ((8080, 8080), (9000, 9010))
    assert sysctls.get("net.ipv4.tcp_syncookies") == 1


def test_values_read_again_but_parsed_only_when_a_text_changed(tmp_path: Path) -> None:
    from tcpwatch.sources.filememo import FileMemo

    write_sysctl(tmp_path, "net.core.somaxconn", "128\n")
    write_sysctl(tmp_path, "net.ipv4.tcp_fin_timeout", "sixty\n")
    write_sysctl(tmp_path, RESERVED_PORTS, "40100\n")
    paths = ProcPaths(root=str(tmp_path))
    memo = FileMemo()
    first = read_sysctl_files(paths, memo=memo, netns=5)
    assert first == read_sysctl_files(paths)  # the same outcome, skipped notes included
    assert read_sysctl_files(paths, memo=memo, netns=5) is first
    write_sysctl(tmp_path, "net.core.somaxconn", "4096\n")  # no mtime needed: read each time
    second = read_sysctl_files(paths, memo=memo, netns=5)
    assert second.sysctls.values["net.core.somaxconn"] == (4096,)
    assert second == read_sysctl_files(paths)
    write_sysctl(tmp_path, RESERVED_PORTS, "x\n")
    third = read_sysctl_files(paths, memo=memo, netns=5)
    assert not third.sysctls.reserved_ports_known and third == read_sysctl_files(paths)
    assert memo.parses == 4  # the paths once, the texts three times
