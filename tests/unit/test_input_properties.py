"""Property-based: whatever a user puts in `--listen`, a duration flag or either configuration
file, tcpwatch either accepts it or says what is wrong on stderr, one ``tcpwatch: ...`` line per
problem, exit 3, no traceback, in bounded time (issue 12, "Every user-facing input path").

The CLI runs in-process (``tcpwatch.cli.main``) so hundreds of inputs take seconds. Every run
points ``--procfs`` at an empty directory, so even an accepted input ends in one known refusal
("does not look like a procfs mount") and nothing is ever polled or bound. Inputs built to hold
one fault must give exactly one line; random whole files may hold several problems, each one
line, at most MAX_ERRORS.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tcpwatch.daemon as daemon_module
from tcpwatch.cli import EXIT_UNKNOWN, main
from tcpwatch.config import ConfigError, load_config
from tcpwatch.errors import UsageError
from tcpwatch.http.listen import ListenError, parse_listen
from tcpwatch.http.webconfig import load_web_config
from tcpwatch.validation import MAX_ERRORS, parse_duration, parse_seconds
from tests.unit.plugin_output import assert_unknown_stdout

# Sized to run in a few seconds on a loaded 2-core CI machine; the deadline catches one slow
# example (a blocking read, an expansion) long before the whole run would.
PROPERTY = settings(
    max_examples=150,
    deadline=2000,
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LINE_LIMIT = 600  # characters per stderr line, file names included

# Text a user could type or a file could hold: every Unicode category, digits of other scripts,
# control characters, and the characters the parsers care about.
ANY_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list(":[]%.-_ \t\n\r\0²٣" + string.digits)),
    ),
    max_size=80,
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """``tcpwatch ARGV`` in-process; asserts exit 3 and clean one-line-per-problem stderr."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as stop:  # --help or --version
        code = stop.code
    out, err = capsys.readouterr()
    assert code == EXIT_UNKNOWN, (code, out, err)
    assert_unknown_stdout(argv, out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert err.endswith("\n") and 1 <= len(lines) <= MAX_ERRORS, err
    for line in lines:
        assert line.startswith("tcpwatch: "), err
        assert len(line) <= LINE_LIMIT, line
    return lines


@pytest.fixture
def empty(tmp_path: Path) -> str:
    directory = tmp_path / "not-proc"
    directory.mkdir()
    return str(directory)


def refused_for_procfs(line: str, empty: str) -> bool:
    return line.startswith(f"tcpwatch: {empty} does not look like a procfs mount")


# -- --listen -------------------------------------------------------------------------------------


@PROPERTY
@given(text=ANY_TEXT.filter(bool))
@example(text=":²")
@example(text=":٣")
@example(text="a..b:9477")
@example(text="a" * 300 + ":1")
@example(text="\udcff:1")
def test_any_listen_address(capsys: pytest.CaptureFixture[str], empty: str, text: str) -> None:
    try:
        parsed = parse_listen(text)
    except ListenError as error:
        assert "\n" not in str(error) and len(str(error)) < LINE_LIMIT
        parsed = None
    else:
        assert 0 <= parsed.port <= 65535
        assert all(c in string.digits for c in text.rpartition(":")[2])  # ASCII digits only
    (line,) = run(capsys, "serve", f"--listen={text}", "--procfs", empty)
    if parsed is None:
        assert line.startswith("tcpwatch: listen address ") or "NUL" in line, line
    else:
        assert refused_for_procfs(line, empty), line


# -- durations ------------------------------------------------------------------------------------


@PROPERTY
@given(text=ANY_TEXT)
def test_any_window_flag(capsys: pytest.CaptureFixture[str], empty: str, text: str) -> None:
    seconds = parse_seconds(text)
    assert seconds is None or 0 <= seconds < float("inf")
    (line,) = run(capsys, "check", f"--window={text}", "--procfs", empty)
    if seconds is not None and seconds <= 300:
        assert refused_for_procfs(line, empty), line
    else:
        assert line.startswith(("tcpwatch: argument --window: ", "tcpwatch: --window: ")), line


@PROPERTY
@given(
    parts=st.lists(
        st.tuples(
            st.integers(0, 10_000),
            st.sampled_from(["ns", "us", "µs", "ms", "s", "m", "h"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_durations_add_up(parts: list[tuple[int, str]]) -> None:
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    text = "".join(f"{number}{unit}" for number, unit in parts)
    expected = sum(number * scale[unit] for number, unit in parts)
    assert parse_duration(text) == pytest.approx(expected)
    assert parse_seconds(text) == pytest.approx(expected)


@PROPERTY
@given(
    value=st.one_of(st.floats(allow_nan=True), st.integers(), st.booleans(), st.none(), ANY_TEXT)
)
def test_parse_seconds_never_raises(value: object) -> None:
    seconds = parse_seconds(value)
    assert seconds is None or (0 <= seconds < float("inf"))


# -- configuration files --------------------------------------------------------------------------

# Random YAML documents: scalars of every YAML type, nested lists and mappings.
YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    ANY_TEXT,
)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
CONFIG_KEYS = ["interval", "log_level", "procfs", "listen", "web_config", "namespaces"]
CONFIG_PATHS = [
    ("check", "window"),
    ("collect", "established"),
    ("collect", "process_scan_timeout"),
    ("collect", "destinations_interval"),
    ("collect", "top_processes"),
    ("rules", "S01"),
    ("rules",),
    ("collect",),
]


def dump(document: object) -> str:
    return yaml.safe_dump(document, allow_unicode=True)


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    return str(path)


@PROPERTY
@given(content=st.one_of(st.binary(max_size=300), ANY_TEXT, YAML_VALUES.map(dump)))
def test_any_config_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, empty: str, content: str | bytes
) -> None:
    path = write(tmp_path / "config.yaml", content)
    run(capsys, "check", "--config", path, "--procfs", empty)


@PROPERTY
@given(key=st.sampled_from(CONFIG_KEYS), value=YAML_VALUES)
def test_one_bad_value_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, empty: str, key: str, value: object
) -> None:
    path = write(tmp_path / "config.yaml", dump({key: value}))
    (line,) = run(capsys, "check", "--config", path, "--procfs", empty)
    assert refused_for_procfs(line, empty) or line.startswith(f"tcpwatch: {path}: {key}: "), line


@PROPERTY
@given(where=st.sampled_from(CONFIG_PATHS), value=YAML_VALUES)
def test_nested_values_load_or_fail_in_bounded_lines(
    tmp_path: Path, where: tuple[str, ...], value: object
) -> None:
    document: Any = value
    for key in reversed(where):
        document = {key: document}
    path = write(tmp_path / "config.yaml", dump(document))
    try:
        load_config(path)
    except ConfigError as error:
        assert 1 <= len(error.errors) <= MAX_ERRORS
        for line in error.errors:
            assert line.startswith(f"{path}: ") or line.startswith("... and ")
            assert "\n" not in line and len(line) <= LINE_LIMIT, line


WEB_SECTIONS = ["tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"]


@PROPERTY
@given(
    content=st.one_of(
        st.binary(max_size=300),
        ANY_TEXT,
        YAML_VALUES.map(dump),
        st.tuples(st.sampled_from(WEB_SECTIONS), YAML_VALUES).map(lambda kv: dump({kv[0]: kv[1]})),
        YAML_VALUES.map(
            lambda v: dump({"http_server_config": {"headers": {"X-Frame-Options": v}}})
        ),
        YAML_VALUES.map(lambda v: dump({"rate_limit": {"interval": v, "burst": 1}})),
    )
)
def test_any_web_config_file(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | bytes,
) -> None:
    path = write(tmp_path / "web.yml", content)
    try:
        web = load_web_config(path)
    except ConfigError as error:
        for line in error.errors:
            assert "\n" not in line and len(line) <= LINE_LIMIT, line
    else:
        for name, value in web.headers.items():
            (name + ": " + value).encode("latin-1")  # what http.server will send
            assert "\r" not in value and "\n" not in value
    # The same through `serve`, stopped just before it would start serving.
    procfs = tmp_path / "proc"
    (procfs / "net").mkdir(parents=True, exist_ok=True)
    (procfs / "net" / "sockstat").write_text("")

    def stop_here() -> None:
        raise UsageError("the web config was accepted")

    monkeypatch.setattr(daemon_module.Notifier, "from_environment", stop_here)
    lines = run(
        capsys, "serve", "--web-config", path, "--listen", "127.0.0.1:0", "--procfs", str(procfs)
    )
    assert lines == ["tcpwatch: the web config was accepted"] or all(
        line.startswith((f"tcpwatch: {path}: ", "tcpwatch: ... and ")) for line in lines
    ), lines
