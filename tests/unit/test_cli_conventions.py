"""Issue 11, items 1, 6 and 7: node_exporter's flag names and log formats, --path.rootfs, rule
pages (URLs and offline), `rules --config/--format json`, Nagios perfdata, --emit-sysctl,
--color, and no abbreviated flags."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import tcpwatch.snapshot as snapshot_source
import tcpwatch.sources.sysctl_files as sysctl_files
from tcpwatch.cli import EXIT_UNKNOWN, build_parser, main
from tcpwatch.cli_parser import _Parser
from tcpwatch.config import CollectSettings, parse_config
from tcpwatch.logformat import fields, logfmt_value, setup_logging
from tcpwatch.model import Snapshot
from tcpwatch.paths import ProcPaths
from tcpwatch.render.sysctl_snippet import render_sysctl_snippet
from tcpwatch.render.text import perfdata
from tcpwatch.rules import RULES
from tcpwatch.rules.fixes import persisted_settings, reserve_ports_fix, sysctl_fix
from tcpwatch.sources.base import Source, SourceContext
from tcpwatch.sources.registry import registered_sources
from tests.unit.snapshots import carried_owners, listener, snapshot, socket_table
from tests.unit.test_cli import FakePoll, run_cli

# -- a strict logfmt parser (the grammar of go-logfmt, which node_exporter's logs follow) ---------

_KEY = re.compile(r'[^\s="\\]+')
_BARE = re.compile(r'[^\s="\\]+')
_QUOTED = re.compile(r'"((?:[^"\\\x00-\x1f]|\\["\\nrt]|\\u[0-9a-f]{4})*)"')


def parse_logfmt(line: str) -> dict[str, str]:
    """key=value pairs separated by one space; a value bare or double-quoted with escapes.
    Anything else (an unquoted space in a value, a stray quote, a control character, a
    duplicate key, a newline) raises ValueError."""
    if "\n" in line or "\r" in line:
        raise ValueError(f"not one line: {line!r}")
    pairs: dict[str, str] = {}
    at = 0
    while at < len(line):
        key = _KEY.match(line, at)
        if key is None or line[key.end() : key.end() + 1] != "=":
            raise ValueError(f"expected key= at {at}: {line!r}")
        at = key.end() + 1
        quoted = _QUOTED.match(line, at)
        if quoted is not None:
            value = json.loads(quoted.group(0))  # the same escapes as JSON strings
            at = quoted.end()
        else:
            bare = _BARE.match(line, at)
            if bare is None:
                raise ValueError(f"expected a value at {at}: {line!r}")
            value, at = bare.group(0), bare.end()
        if key.group(0) in pairs:
            raise ValueError(f"duplicate key {key.group(0)}: {line!r}")
        pairs[key.group(0)] = value
        if at < len(line):
            if line[at] != " ":
                raise ValueError(f"expected a space at {at}: {line!r}")
            at += 1
    return pairs


def test_the_strict_parser_refuses_what_the_old_format_wrote() -> None:
    # Control: the line tcpwatch wrote before (unquoted message with spaces) is not logfmt.
    with pytest.raises(ValueError):
        parse_logfmt("level=ERROR msg=reload failed, still running")
    with pytest.raises(ValueError):
        parse_logfmt('msg="open quote')
    assert parse_logfmt('a=1 b="x y"') == {"a": "1", "b": "x y"}


TRICKY = [
    "plain",
    "reload failed, still running the previous configuration",
    'key=value "quoted" \\backslash\\',
    "two\nlines\r\tand a tab",
    "escape \x1b[31m and NUL \x00",
    "ünïcode ✓",
    "",
    "=",
]


@pytest.mark.parametrize("message", TRICKY)
def test_logfmt_records_parse_back_exactly(message: str) -> None:
    stream = io.StringIO()
    setup_logging("debug", "logfmt", stream)
    try:
        logging.getLogger("tcpwatch.test").warning("%s", message)
    finally:
        setup_logging("info")
    (line,) = stream.getvalue().splitlines()
    fields = parse_logfmt(line)
    assert list(fields) == ["ts", "level", "msg"]
    assert fields["level"] == "warn"
    assert fields["msg"] == message
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"]), fields["ts"]


def test_logfmt_exception_is_one_quoted_field() -> None:
    stream = io.StringIO()
    setup_logging("debug", "logfmt", stream)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("tcpwatch.test").exception("source failed")
    finally:
        setup_logging("info")
    (line,) = stream.getvalue().splitlines()
    fields = parse_logfmt(line)
    assert fields["level"] == "error" and fields["msg"] == "source failed"
    assert fields["exc"].startswith("Traceback") and "RuntimeError: boom" in fields["exc"]


@pytest.mark.parametrize("message", TRICKY)
def test_json_records_are_one_object_per_line(message: str) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    try:
        logging.getLogger("tcpwatch.test").info("%s", message)
        logging.getLogger("tcpwatch.test").debug("not shown at info")
    finally:
        setup_logging("info")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert list(record) == ["ts", "level", "msg"]
    assert (record["level"], record["msg"]) == ("info", message)


def test_logfmt_value_is_bare_only_when_unambiguous() -> None:
    assert logfmt_value("abc") == "abc"
    assert logfmt_value("a b") == '"a b"'
    assert logfmt_value("") == '""'
    assert logfmt_value('say "hi"') == '"say \\"hi\\""'


def test_log_format_flag_reaches_the_log_lines_of_a_real_run(tmp_path: Path) -> None:
    # A real process that logs: check with a config that disables nothing but asks for json.
    config = tmp_path / "c.yaml"
    config.write_text("log_format: json\nlog_level: debug\n")
    result = run_cli("check", "--window", "0", "--config", str(config), "--netns", "tw-none-9")
    assert result.returncode == EXIT_UNKNOWN
    # The usage error is plain text (one line for the person); no log line is half-written.
    assert result.stderr.splitlines()[-1].startswith("tcpwatch: "), result.stderr
    for line in result.stderr.splitlines()[:-1]:
        json.loads(line)


# -- flag names ---------------------------------------------------------------------------------

ALIASES = [
    (["--path.procfs", "/p"], ["--procfs", "/p"], "procfs", "check"),
    (["--log.level", "debug"], ["--log-level", "debug"], "log_level", "metrics"),
    (["--web.listen-address", ":1"], ["--listen", ":1"], "listen", "serve"),
    (["--web.config.file", "w.yml"], ["--web-config", "w.yml"], "web_config", "serve"),
]


@pytest.mark.parametrize(("new", "old", "dest", "command"), ALIASES)
def test_old_flag_names_are_aliases_of_the_new(
    new: list[str], old: list[str], dest: str, command: str
) -> None:
    parser = build_parser()
    assert getattr(parser.parse_args([command, *new]), dest) == new[1]
    assert getattr(parser.parse_args([command, *old]), dest) == old[1]
    result = run_cli(command, "--help")
    assert f"{new[0]} " in result.stdout and f"{old[0]} " in result.stdout


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


def test_abbreviations_are_off_on_every_parser() -> None:
    parsers = _all_parsers(build_parser())
    assert len(parsers) == 6
    assert all(isinstance(p, _Parser) and p.allow_abbrev is False for p in parsers)


@pytest.mark.parametrize(
    "args",
    [["check", "--windo", "3"], ["check", "--form", "json"], ["serve", "--web.listen", ":1"]],
)
def test_an_abbreviated_flag_is_an_error(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == EXIT_UNKNOWN
    assert "unrecognized arguments" in result.stderr and args[1] in result.stderr


def test_no_sysfs_flag_because_nothing_reads_sysfs() -> None:
    source = Path(sysctl_files.__file__).parents[1]
    readers = [
        path.name
        for path in source.rglob("*.py")
        if re.search(r"[\"']/sys/", path.read_text().replace("/proc/sys", ""))
    ]
    # The tracepoints source finds tracefs at its own mount points (not sysfs: a container
    # mounts the node's there, docs/fleet.md) and reads the online CPUs, the same kernel-wide
    # list in any mount namespace. Neither is a tree a --path.sysfs would move.
    assert sorted(readers) == ["perf.py", "tracefs.py"]
    assert "--path.sysfs" not in run_cli("check", "--help").stdout.replace("No --path.sysfs", "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("log_format: xml\n", "log_format: expected one of logfmt, json"),
        ("docs_url: ftp://x\n", "docs_url: expected an http(s):// URL"),
        ('rootfs: "a\\0b"\n', "rootfs: a path cannot contain a NUL byte"),
    ],
)
def test_new_config_keys_are_validated(text: str, message: str) -> None:
    with pytest.raises(Exception) as raised:
        parse_config(text, "c.yaml")
    assert any(message in line for line in raised.value.errors), raised.value.errors  # type: ignore[attr-defined]


def test_new_config_keys_are_read() -> None:
    config = parse_config(
        "rootfs: /host\nlog_format: json\ndocs_url: https://docs.example/tw/\n", "c.yaml"
    )
    assert (config.rootfs, config.log_format, config.docs_url) == (
        "/host",
        "json",
        "https://docs.example/tw",
    )


# -- --path.rootfs: K03 from a leftover line in the host's files -----------------------------------


def fixture_root(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    (root / "etc" / "sysctl.d").mkdir(parents=True)
    (root / "etc" / "sysctl.conf").write_text("# old tuning\nnet.ipv4.tcp_tw_recycle = 1\n")
    # An absolute link, as on some distributions: it must resolve below the root.
    os.symlink("/etc/sysctl.conf", root / "etc" / "sysctl.d" / "99-sysctl.conf")
    return root


def test_rootfs_reads_the_hosts_files_and_follows_absolute_links_inside_it(
    tmp_path: Path,
) -> None:
    entries = sysctl_files.read_persisted_sysctls(str(fixture_root(tmp_path)))
    assert [(e.path, e.line, e.name) for e in entries] == [
        ("/etc/sysctl.d/99-sysctl.conf", 2, "net.ipv4.tcp_tw_recycle")
    ]


class FakePollReadingSysctlFiles(FakePoll):
    """A built snapshot, plus what the registered sysctl_files source reads below the rootfs
    the CLI handed poll() (the kernel is faked, the host's files are not)."""

    def __call__(
        self,
        settings: CollectSettings,
        selection: tuple[str, ...] = ("self",),
        paths: ProcPaths | None = None,
        *more: Any,
        **keywords: Any,
    ) -> tuple[Snapshot, ...]:
        (built,) = super().__call__(settings, selection, paths, *more, **keywords)
        source = next(s for s in registered_sources() if s.name == "sysctl_files")
        assert isinstance(source, Source)
        context = SourceContext(paths or ProcPaths(), settings, built.netns, 0, built.taken_at)
        persisted = source.read(context, [built])
        assert isinstance(persisted, tuple)
        return (replace(built, persisted_sysctls=persisted),)


def run_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(snapshot_source, "poll", FakePollReadingSysctlFiles(snapshot()))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    code = main(["check", "--window", "0", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_k03_fires_from_the_rootfs_and_not_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fixture_root(tmp_path)
    _, out, _ = run_check(monkeypatch, capsys, "--format", "json", "--path.rootfs", str(root))
    (k03,) = [f for f in json.loads(out)["findings"] if f["id"] == "K03"]
    assert "/etc/sysctl.d/99-sysctl.conf:2" in json.dumps(k03["evidence"])
    assert str(root) not in json.dumps(k03)  # paths as the host sees them
    empty = tmp_path / "empty"
    empty.mkdir()
    _, out, _ = run_check(monkeypatch, capsys, "--format", "json", "--path.rootfs", str(empty))
    assert "K03" not in [f["id"] for f in json.loads(out)["findings"]]


# -- rule pages: URLs and offline -----------------------------------------------------------------


def test_rules_id_prints_the_shipped_page() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("Q01", "q01", "accept-queue-full"):
        result = run_cli("rules", name)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (root / "docs/rules/Q01-accept-queue-full.md").read_text()
    result = run_cli("rules", "Q99")
    assert result.returncode == EXIT_UNKNOWN and result.stderr.startswith("tcpwatch: rules: ")


def test_every_rule_page_is_package_data() -> None:
    from importlib import resources

    for rule in RULES:
        page = resources.files("tcpwatch").joinpath("ruledocs", rule.doc.rsplit("/", 1)[-1])
        assert page.read_text(encoding="utf-8").startswith(f"# {rule.id} "), rule.doc


def test_docs_url_moves_every_link_in_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    full = snapshot(
        sockets=socket_table([listener(8080, queue_length=129, queue_max=128, inode=7001)])
    )
    monkeypatch.setattr(snapshot_source, "poll", FakePoll(full))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    config = tmp_path / "c.yaml"
    config.write_text("docs_url: https://wiki.example/tcpwatch\n")
    main(["check", "--window", "0", "--format", "json", "--config", str(config)])
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert findings
    for finding in findings:
        assert finding["doc_url"] == f"https://wiki.example/tcpwatch/{finding['doc']}"
    main(["check", "--window", "0", "--docs-url", "https://other.example/x/"])
    text = capsys.readouterr().out
    assert "https://other.example/x/docs/rules/Q01-accept-queue-full.md" in text
    assert "OWNER" not in text


# -- rules --config / --format json ---------------------------------------------------------------


def test_rules_with_config_shows_effective_thresholds(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("rules:\n  Q01:\n    warning: 0.5\n  S02: false\n")
    out = run_cli("rules", "--config", str(config)).stdout
    assert "rules.Q01.warning = 0.5 (ratio, configured; default 0.8): " in out
    (critical,) = [line for line in out.splitlines() if "rules.Q01.critical" in line]
    assert "configured" not in critical
    (s02,) = [line for line in out.splitlines() if line.startswith("S02 ")]
    assert s02.endswith("[disabled by config]")
    assert "rules.Q01.warning = 0.8 (ratio): " in run_cli("rules").stdout


def test_rules_with_config_shows_the_window(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("rules:\n  window: 2m\n")
    out = run_cli("rules", "--config", str(config)).stdout
    assert "# rules.window = 120 (seconds, configured; default 60): " in out
    document = json.loads(run_cli("rules", "--format", "json", "--config", str(config)).stdout)
    assert (document["window_seconds"], document["window_configured"]) == (120, True)


def test_rules_json(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("rules:\n  Q01:\n    warning: 0.5\n  S02: false\n")
    result = run_cli("rules", "--format", "json", "--config", str(config))
    document: dict[str, Any] = json.loads(result.stdout)
    by_id = {rule["id"]: rule for rule in document["rules"]}
    assert list(by_id) == [rule.id for rule in RULES]
    (warning,) = [t for t in by_id["Q01"]["thresholds"] if t["name"] == "warning"]
    assert (warning["value"], warning["default"], warning["configured"]) == (0.5, 0.8, True)
    assert by_id["S02"]["enabled"] is False and by_id["Q01"]["enabled"] is True
    assert by_id["Q01"]["doc_url"] is None  # no docs_url: no published copy to link
    single = json.loads(run_cli("rules", "Q01", "--format", "json").stdout)
    assert single["id"] == "Q01" and single["thresholds"]
    site = run_cli("rules", "Q01", "--format", "json", "--docs-url", "https://docs.internal/tw")
    assert json.loads(site.stdout)["doc_url"] == (
        "https://docs.internal/tw/docs/rules/Q01-accept-queue-full.md"
    )


# -- check: perfdata, --emit-sysctl, --color, progress, --window 0 --------------------------------

PERF = re.compile(r"^'?[^'=]+'?=-?[0-9.]+(s|us|ms|%|B|KB|MB|TB|c)?(;-?[0-9.]*){0,4}$")


def test_perfdata_follows_the_plugin_guidelines() -> None:
    full = snapshot(
        sockets=socket_table(
            [
                listener(80, queue_length=10, queue_max=100),
                listener(8080, queue_length=60, queue_max=128),
            ],
            close_wait_inodes=[1, 2, 3],
        )
    )
    perf = perfdata([], [full], (0.8, 1.0))
    items = perf.split(" ")
    assert all(PERF.match(item) for item in items), items
    assert items[:3] == ["critical=0;;;0", "warning=0;;;0", "info=0;;;0"]
    assert "accept_queue_fill=46.9%;80;100;0;100" in items
    assert "close_wait=3;;;0" in items
    # No socket table: no gauges made up from nothing.
    assert "accept_queue_fill" not in perfdata([], [snapshot(sockets=None, stat=None)])


def test_check_first_line_carries_perfdata(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sysctl_files, "read_persisted_sysctls", lambda root="/": ())
    code, out, _ = run_check(monkeypatch, capsys, "--color", "never")
    first = out.splitlines()[0]
    status, _, perf = first.partition(" | ")
    assert status.startswith("TCPWATCH ") and code in (0, 1, 2)
    assert all(PERF.match(item) for item in perf.split(" ")), perf


def test_persisted_settings_read_back_every_shape_sysctl_fix_writes() -> None:
    assert persisted_settings(sysctl_fix("host", "net.core.somaxconn", 4096)) == [
        ("net.core.somaxconn", "4096")
    ]
    ranges = sysctl_fix("host", "net.ipv4.ip_local_port_range", "15000 64999")
    assert persisted_settings(ranges) == [("net.ipv4.ip_local_port_range", "15000 64999")]
    assert persisted_settings(sysctl_fix("pod:a/b", "net.core.somaxconn", 4096)) == []
    reserve = reserve_ports_fix(
        "host", snapshot(sockets=socket_table([listener(40000, inode=7001)]))
    )
    assert reserve is not None
    assert persisted_settings(reserve) == [("net.ipv4.ip_local_reserved_ports", "40000")]


def test_emit_sysctl_one_snippet_with_reasons(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = snapshot(
        sysctl_overrides={
            "net.ipv4.tcp_syncookies": (0,),
            "net.core.somaxconn": (128,),
        },
        sockets=socket_table([listener(8080, queue_length=129, queue_max=128, inode=7001)]),
    )
    monkeypatch.setattr(snapshot_source, "poll", FakePoll(bad))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    code = main(["check", "--window", "0", "--emit-sysctl"])
    out = capsys.readouterr().out
    assert code == 2
    settings = [line for line in out.splitlines() if line and not line.startswith("#")]
    names = [line.split(" = ")[0] for line in settings]
    assert len(names) == len(set(names)), out  # each sysctl once
    assert "net.ipv4.tcp_syncookies = 1" in settings
    lines = out.splitlines()
    for setting in settings:
        above = lines[lines.index(setting) - 1]
        assert re.match(r"# [KPQS]\d\d [a-z-]+ \((critical|warning|info)\): ", above), above
    # The snippet is a valid sysctl.d file: the project's own strict parser reads it whole.
    parsed = sysctl_files.parse_sysctl_conf(out, "90-tcpwatch.conf", strict=True)
    assert [p.name for p in parsed] == names


def test_emit_sysctl_keeps_one_value_per_name() -> None:
    from tcpwatch.rules import Finding

    def finding(rule_id: str, severity: str, value: int) -> Finding:
        return Finding(
            rule_id, "slug", severity, f"t{rule_id}", "host", "", {},  # type: ignore[arg-type]
            sysctl_fix("host", "net.core.somaxconn", value), "docs/rules/x.md",
        )  # fmt: skip

    text = render_sysctl_snippet(
        [finding("Q03", "warning", 1024), finding("Q01", "critical", 4096)]
    )
    assert [line for line in text.splitlines() if not line.startswith("#") and line] == [
        "net.core.somaxconn = 4096"
    ]
    assert "# Q03 slug (warning): tQ03 proposes net.core.somaxconn = 1024, not written" in text


@pytest.mark.parametrize(
    ("flag", "no_color", "coloured"),
    [("always", None, True), ("never", None, False), ("auto", None, False), ("always", "1", True)],
)
def test_color_flag(
    flag: str,
    no_color: str | None,
    coloured: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    _, out, _ = run_check(monkeypatch, capsys, "--color", flag)
    assert ("\033[" in out) is coloured  # captured stdout is no terminal: auto is off


def test_window_zero_is_one_poll_and_says_nothing_on_a_pipe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    poll = FakePoll(snapshot())
    monkeypatch.setattr(snapshot_source, "poll", poll)
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    monkeypatch.setattr("time.sleep", lambda seconds: pytest.fail("slept with --window 0"))
    assert main(["check", "--window", "0"]) in (0, 1, 2)
    assert poll.calls == 1
    assert capsys.readouterr().err == ""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_window_on_a_terminal_says_what_it_waits_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(snapshot_source, "poll", FakePoll(snapshot(), snapshot()))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    main(["check", "--window", "3"])
    assert slept == [3.0]
    assert "watching the kernel counters for 3 s" in tty.getvalue()
    # Not on a pipe: the same run on a non-terminal stderr stays silent.
    monkeypatch.setattr("sys.stderr", io.StringIO())
    main(["check", "--window", "3"])
    assert "watching" not in capsys.readouterr().err


@pytest.mark.parametrize("log_format", ["logfmt", "json"])
def test_a_record_carries_its_own_fields_after_msg(log_format: str) -> None:
    """serve's start line, as node_exporter's: msg="Listening on" address=[::]:9477 tls=false."""
    stream = io.StringIO()
    setup_logging("info", log_format, stream)
    try:
        logging.getLogger("tcpwatch.test").info(
            "Listening on", extra=fields(address="[::]:9477", tls="false")
        )
    finally:
        setup_logging("info")
    (line,) = stream.getvalue().splitlines()
    parsed = parse_logfmt(line) if log_format == "logfmt" else json.loads(line)
    assert list(parsed) == ["ts", "level", "msg", "address", "tls"]
    assert (parsed["msg"], parsed["address"], parsed["tls"]) == (
        "Listening on",
        "[::]:9477",
        "false",
    )
