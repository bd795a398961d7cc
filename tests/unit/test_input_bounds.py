"""Hostile and careless input (issue 12, items 3 and 5): every case is refused in one short line,
fast, without blocking, without a traceback, and without unbounded memory or output.

The CLI cases run as real processes (``python -m tcpwatch``, from test_cli.run_cli): the exit
code and stderr are what an operator sees; a blocking read would hit run_cli's timeout.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpwatch.cli import EXIT_UNKNOWN, main, rule_catalogue
from tcpwatch.config import ConfigError, load_config, parse_config
from tcpwatch.http.listen import ListenAddress, ListenError, parse_listen
from tcpwatch.http.webconfig import WebConfigError, load_web_config, parse_web_config
from tcpwatch.validation import (
    MAX_ERRORS,
    MAX_FILE_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    parse_duration,
    parse_seconds,
    read_config_file,
)
from tests.unit.test_cli import run_cli, usage_error

# Every error line here stays well under this many characters (the file name included).
LINE_LIMIT = 600
FAST = 5.0  # seconds: a refused file is refused at once (1 s unloaded; CI shares its cores)


def billion_laughs(levels: int = 8) -> str:
    """The classic alias bomb: 9 ** levels strings from a few hundred bytes."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        ref = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{','.join([ref] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "config.fifo"
    os.mkfifo(path)
    yield path


def config_error(path: Path | str, web: bool = False) -> list[str]:
    """The error lines of loading ``path``; asserts they came fast and each is one short line.

    The load runs in a thread, so a blocking open or read fails the test instead of hanging it.
    """
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            (load_web_config if web else load_config)(str(path))
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(FAST)
    assert not loader.is_alive(), f"loading {path} took more than {FAST} s (blocked?)"
    (error,) = outcome
    assert isinstance(error, WebConfigError if web else ConfigError), repr(error)
    for line in error.errors:
        assert "\n" not in line and len(line) < LINE_LIMIT, line
    return error.errors


# -- the file itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("web", [False, True], ids=["config", "web-config"])
def test_billion_laughs_is_refused_at_its_first_alias(tmp_path: Path, web: bool) -> None:
    text = billion_laughs(8)
    assert len(text.encode()) < 500  # the 470-byte bomb of issue 12 (8 levels)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.monotonic()
    (line,) = config_error(path, web)
    assert time.monotonic() - started < 1.0  # refused at the first alias, nothing expanded
    assert line == (
        f"{path}: line 2: aliases (*name) are not allowed in tcpwatch's configuration: write the "
        "value out in full"
    )


def test_billion_laughs_through_check(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs(8))
    started = time.monotonic()
    (line,) = usage_error(run_cli("check", "--config", str(path)))
    assert time.monotonic() - started < 30  # interpreter start-up included
    assert line.startswith(f"tcpwatch: {path}: line 2: aliases (*name) are not allowed")


def test_anchors_without_aliases_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "anchored.yaml"
    path.write_text("interval: &i 30\ncheck: &c\n  window: 2\n")
    config = load_config(str(path))
    assert (config.interval, config.check_window) == (30.0, 2.0)


@pytest.mark.parametrize("web", [False, True], ids=["config", "web-config"])
def test_dev_zero_is_refused_without_reading(web: bool) -> None:
    what = "web config file" if web else "configuration file"
    assert config_error("/dev/zero", web) == [
        f"/dev/zero: cannot read the {what}: it is a device, not a file"
    ]


def test_dev_zero_through_check() -> None:
    (line,) = usage_error(run_cli("check", "--config", "/dev/zero"))
    assert (
        line
        == "tcpwatch: /dev/zero: cannot read the configuration file: it is a device, not a file"
    )


@pytest.mark.parametrize("web", [False, True], ids=["config", "web-config"])
def test_a_fifo_is_refused_without_blocking(fifo: Path, web: bool) -> None:
    what = "web config file" if web else "configuration file"
    assert config_error(fifo, web) == [
        f"{fifo}: cannot read the {what}: it is a FIFO (named pipe), not a file"
    ]


def test_a_fifo_through_check(fifo: Path) -> None:
    # run_cli's timeout turns a blocking open or read into a failure.
    (line,) = usage_error(run_cli("check", "--config", str(fifo)))
    assert line == (
        f"tcpwatch: {fifo}: cannot read the configuration file: it is a FIFO (named pipe), not a "
        "file"
    )


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert config_error(tmp_path) == [
        f"{tmp_path}: cannot read the configuration file: it is a directory, not a file"
    ]


def test_a_fifo_as_certificate_does_not_block(fifo: Path, tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {fifo}\n  key_file: {fifo}\n")
    assert config_error(web, web=True) == [
        f"{web}: tls_server_config.{key}: cannot read {fifo}: it is a FIFO (named pipe), not a file"
        for key in ("cert_file", "key_file")
    ]


def test_a_file_over_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * MAX_FILE_BYTES + b"\n")
    (line,) = config_error(path)
    assert line == (
        f"{path}: the configuration file is larger than 1024 KiB ({MAX_FILE_BYTES + 1} bytes or "
        "more); is this the right file?"
    )
    path.write_bytes(b"#" * (MAX_FILE_BYTES - 20) + b"\ninterval: 20\n")
    assert load_config(str(path)).interval == 20.0


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"interval: 15 # \xe9t\xe9\n")
    assert config_error(path) == [
        f"{path}: not UTF-8 text (byte 15); is this the YAML configuration file?"
    ]


# -- the YAML inside ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,
        "{a: " * 5000 + "1" + "}" * 5000,
        "".join(f"{'  ' * i}- \n" for i in range(200)),  # block style, 200 deep
    ],
    ids=["flow-lists", "flow-mappings", "block-lists"],
)
@pytest.mark.parametrize("web", [False, True], ids=["config", "web-config"])
def test_deep_nesting_is_one_line_not_a_recursion_error(
    tmp_path: Path, text: str, web: bool
) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    (line,) = config_error(path, web)
    assert line.startswith(f"{path}: line 1: nested more than {MAX_YAML_DEPTH} levels deep") or (
        "nested more than" in line
    ), line


def test_deep_nesting_through_check(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000 + "]" * 5000)
    (line,) = usage_error(run_cli("check", "--config", str(path)))
    assert line == f"tcpwatch: {path}: line 1: nested more than {MAX_YAML_DEPTH} levels deep"


def test_too_many_values(tmp_path: Path) -> None:
    path = tmp_path / "wide.yaml"
    path.write_text("rules: [" + "1," * 400_000 + "1]\n")  # 800 KB: under the size limit
    (line,) = config_error(path)
    assert line.startswith(f"{path}: line 1: more than {MAX_YAML_NODES} values")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("when: 2001-13-45\n", "month must be in 1..12"),
        ("interval: " + "9" * 5000 + "\n", "integer string conversion"),
        ("? [a]\n: 1\n", "not valid YAML: found unhashable key"),
        ("a: !!python/object:os.system x\n", "not valid YAML: could not determine a constructor"),
    ],
    ids=["bad-date", "huge-int", "unhashable-key", "python-tag"],
)
def test_constructor_failures_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    (line,) = config_error(path)
    assert message in line


def test_every_error_line_is_bounded(tmp_path: Path) -> None:
    long_value = "x" * 100_000
    path = tmp_path / "long.yaml"
    path.write_text(f"log_level: {long_value}\n? {long_value}\n: 1\nprocfs: [{'1, ' * 2000}1]\n")
    errors = config_error(path)
    assert len(errors) == 3
    assert "... (100000 characters): unknown key" in errors[0]
    assert errors[1].endswith("procfs: expected a non-empty string, got [1, 1, 1, 1, 1, 1, ...]")
    assert errors[2].endswith('... (100000 characters)"')


def test_newlines_in_values_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nl.yaml"
    path.write_text('log_level: "a\\nb\\u0000c"\n"x\\ny": 1\n')
    assert config_error(path) == [
        f"{path}: x\\ny: unknown key (known: check, collect, docs_url, interval, listen, "
        "log_format, log_level, namespaces, procfs, rootfs, rules, web_config)",
        f'{path}: log_level: expected one of debug, info, warning, error, got "a\\nb\\x00c"',
    ]


def test_the_number_of_error_lines_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("".join(f"key{i}: 1\n" for i in range(500)))
    errors = config_error(path)
    assert len(errors) == MAX_ERRORS
    assert errors[-1] == f"... and {500 - MAX_ERRORS + 1} more problems"


# -- paths ----------------------------------------------------------------------------------------


def test_a_nul_byte_in_a_path() -> None:
    with pytest.raises(ConfigError) as caught:
        read_config_file("/etc/tcp\0watch.yaml", "configuration file")
    assert caught.value.errors == [
        "/etc/tcp\\x00watch.yaml: cannot read the configuration file: the path contains a NUL byte"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'procfs: "/pr\\0oc"\n',
            'c.yaml: procfs: a path cannot contain a NUL byte, got "/pr\\x00oc"',
        ),
        (
            'web_config: "/etc/web\\0.yml"\n',
            'c.yaml: web_config: a path cannot contain a NUL byte, got "/etc/web\\x00.yml"',
        ),
    ],
)
def test_a_nul_byte_in_a_configured_path(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml")
    assert caught.value.errors == [expected]


def test_a_nul_byte_in_a_certificate_path() -> None:
    with pytest.raises(WebConfigError) as caught:
        parse_web_config('tls_server_config:\n  cert_file: "a\\0"\n  key_file: k\n', "w.yml")
    assert caught.value.errors == [
        'w.yml: tls_server_config.cert_file: a path cannot contain a NUL byte, got "a\\x00"'
    ]


def test_a_nul_byte_in_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    # argv cannot carry a NUL; main() called from Python can.
    assert main(["check", "--config", "a\0b"]) == EXIT_UNKNOWN
    assert capsys.readouterr().err == 'tcpwatch: --config: contains a NUL byte: "a\\x00b"\n'


# -- what the HTTP layer sends --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("max-age=60 — €", "a header value must be Latin-1 text without control characters"),
        ("deny\x7f", "a header value must be Latin-1 text without control characters"),
        ("deny\x00", "a header value must be Latin-1 text without control characters"),
        ("deny\rX-Evil: 1", "a header value must be one line"),
        ("x" * 5000, "a header value is at most 4096 characters, got 5000"),
    ],
    ids=["euro", "del", "nul", "cr", "long"],
)
def test_header_values_the_server_cannot_send_are_refused(value: str, problem: str) -> None:
    escaped = value.replace("\\", "\\\\").replace("\r", "\\r").replace("\x00", "\\0")
    escaped = escaped.replace("\x7f", "\\x7f")
    text = f'http_server_config:\n  headers:\n    X-Frame-Options: "{escaped}"\n'
    with pytest.raises(WebConfigError) as caught:
        parse_web_config(text, "w.yml")
    (line,) = caught.value.errors
    assert line.startswith(f"w.yml: http_server_config.headers.X-Frame-Options: {problem}"), line
    assert len(line) < LINE_LIMIT


def test_latin1_header_values_are_kept() -> None:
    text = (
        "http_server_config:\n  headers:\n"
        "    Content-Security-Policy: \"default-src 'self'\t; é\"\n"
    )
    config = parse_web_config(text, "w.yml")
    assert config.headers == {"Content-Security-Policy": "default-src 'self'\t; é"}
    assert config.headers["Content-Security-Policy"].encode("latin-1")


# -- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (15, 15.0),
        (2.5, 2.5),
        ("15", 15.0),
        ("0.5", 0.5),
        ("15s", 15.0),
        ("1m", 60.0),
        ("100ms", 0.1),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("0", 0.0),
        (" 5s ", 5.0),
        ("250us", 0.00025),
    ],
)
def test_parse_seconds(value: object, seconds: float) -> None:
    assert parse_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "s",
        "fast",
        "1 m",
        "-5s",
        "²s",
        "٣",
        "٣s",
        "1e3",
        "inf",
        "nan",
        True,
        None,
        [1],
        "5" * 70,
        float("inf"),
        float("nan"),
        -1,
    ],
)
def test_parse_seconds_rejects(value: object) -> None:
    assert parse_seconds(value) is None


def test_web_config_durations_keep_go_syntax() -> None:
    assert parse_duration("15") is None  # Go needs a unit: the web config stays exporter-toolkit's
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("٣s") is None


def test_config_durations() -> None:
    config = parse_config(
        'interval: 1m\ncheck:\n  window: 500ms\ncollect:\n  process_scan_timeout: "2s"\n'
        "  destinations_interval: 1h\nrules:\n  S01:\n    stale_seconds: 10m\n"
        "  K09:\n    idle_timeout: 350\n",
        "c.yaml",
        rule_catalogue(),
    )
    assert (config.interval, config.check_window) == (60.0, 0.5)
    assert config.collect.process_scan_timeout == 2.0
    assert config.collect.destinations_interval == 3600.0
    assert config.rules["S01"].thresholds == {"stale_seconds": 600.0}
    assert config.rules["K09"].thresholds == {"idle_timeout": 350.0}


def test_duration_errors_name_the_range() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("interval: 2h\nrules:\n  Q01:\n    warning: 1s\n", "c.yaml", rule_catalogue())
    assert caught.value.errors == [
        "c.yaml: interval: expected a number between 1 and 3600 seconds or a duration such as "
        '"15s", "1m", "100ms" or "1h30m", got "2h"',
        'c.yaml: rules.Q01.warning: expected a number between 0.01 and 1, got "1s"',
    ]


def test_duration_flags(tmp_path: Path) -> None:
    (line,) = usage_error(run_cli("check", "--window", "1m", "--procfs", str(tmp_path)))
    assert line.startswith(f"tcpwatch: {tmp_path} does not look like a procfs mount")
    (line,) = usage_error(run_cli("check", "--window", "6m"))
    assert line == "tcpwatch: --window: expected seconds between 0 and 300, got 360"
    (line,) = usage_error(run_cli("serve", "--interval", "soon"))
    assert line == (
        'tcpwatch: argument --interval: expected seconds or a duration such as "15s", "1m", '
        '"100ms", got "soon" (see tcpwatch --help)'
    )


# -- --listen -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (":²", 'listen address ":²": port must be a number 0-65535, got "²"'),
        (":٣", 'listen address ":٣": port must be a number 0-65535, got "٣"'),
        ("a..b:9477", "a host name has an empty label (two dots in a row, or a leading dot)"),
        (".example:9477", "a host name has an empty label"),
        ("a" * 64 + ".example:9477", "a host name label is at most 63 characters, one has 64"),
        (
            ".".join(["a" * 60] * 5) + ":1",
            "a host name is at most 253 characters, this one has 304",
        ),
        ("\udcff.example:1", "not a valid host name (encoding with 'idna' codec failed"),
        ("-bad.example:1", 'not a valid host name: label "-bad"'),
        ("[example.net]:1", '"example.net" in brackets is not an IPv6 address'),
        (":" + "9" * 5000, 'port must be a number 0-65535, got "99999999999999999999... (5000'),
    ],
    ids=[
        "superscript",
        "arabic-digit",
        "empty-label",
        "leading-dot",
        "long-label",
        "long-name",
        "idna",
        "hyphen",
        "bracketed-name",
        "huge-port",
    ],
)
def test_parse_listen_rejects_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(ListenError) as caught:
        parse_listen(text)
    message = str(caught.value)
    assert problem in message
    assert "\n" not in message and len(message) < LINE_LIMIT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bücher.example:80", ListenAddress("bücher.example", 80)),
        ("example.net.:9477", ListenAddress("example.net.", 9477)),
        ("[fe80::1%lo]:9477", ListenAddress("fe80::1%lo", 9477)),
        ("0.0.0.0:09477", ListenAddress("0.0.0.0", 9477)),
    ],
)
def test_parse_listen_accepts(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (":²", 'tcpwatch: listen address ":²": port must be a number 0-65535, got "²"'),
        (
            "a..b:9477",
            'tcpwatch: listen address "a..b:9477": a host name has an empty label (two dots in a '
            "row, or a leading dot)",
        ),
    ],
)
def test_bad_listen_through_serve(listen: str, expected: str) -> None:
    # Refused before anything is bound or polled.
    assert usage_error(run_cli("serve", "--listen", listen)) == [expected]


def test_a_newline_in_a_configured_path_stays_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('procfs: "/no\\nwhere"\n')
    assert main(["check", "--config", str(path)]) == EXIT_UNKNOWN
    assert capsys.readouterr().err == (
        "tcpwatch: /no\\nwhere does not look like a procfs mount (no net/sockstat): pass "
        "--path.procfs pointing at a mounted /proc\n"
    )
