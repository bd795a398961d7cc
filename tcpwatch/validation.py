"""Checks shared by the configuration files: each problem becomes one line naming the file and
the key path (``config.yaml: rules.Q01.warning: expected a number between 0 and 1, got "high"``).

Also the one bounded reader and YAML loader both configuration files go through (config.yaml and
the web config): a hostile or careless file can cost at most ``MAX_FILE_BYTES`` of reading,
``MAX_YAML_NODES`` parsed values and ``MAX_YAML_DEPTH`` levels of nesting, never blocks (FIFOs and
devices are refused before any read), and every message it produces is one bounded line.
"""

from __future__ import annotations

import errno
import math
import os
import re
import reprlib
import stat
from collections.abc import Collection, Mapping
from typing import Any

from tcpwatch.escape import terminal

# A configuration file is a few KiB; 1 MiB leaves room for long comments and many rules.
MAX_FILE_BYTES = 1 << 20
# Scalars, sequences and mappings in one document: the example config has ~100.
MAX_YAML_NODES = 10_000
# Levels of nesting: the deepest key of either file is 3 levels down.
MAX_YAML_DEPTH = 64
# At most this many problems are listed; the rest are counted in one last line.
MAX_ERRORS = 20
# Longest value or key echoed back in an error message, and longest file name.
MAX_SHOWN_CHARS = 80
MAX_SHOWN_PATH_CHARS = 512
# Longest duration text considered ("1h30m15s500ms" is 13).
_MAX_DURATION_CHARS = 64

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # ASCII digits only: "²" and "٣" are not numbers
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h)")
_BARE_SECONDS = re.compile(rf"{_NUMBER}")
_DURATION_UNITS: Mapping[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU (Go accepts both)
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _short_repr() -> reprlib.Repr:
    """repr() that stops after a few items and levels, whatever the size of the value."""
    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel, short.maxdict, short.maxlist = 3, 4, 6
    short.maxtuple, short.maxset, short.maxfrozenset = 6, 6, 6
    short.maxstring, short.maxother, short.maxlong = 60, 60, 40
    return short


class ConfigError(Exception):
    """One or more configuration errors, each a line naming the file and the key path.

    Lines are bounded: at most ``MAX_ERRORS`` of them, the rest summed up in the last one.
    """

    def __init__(self, errors: list[str]) -> None:
        if len(errors) > MAX_ERRORS:
            more = len(errors) - (MAX_ERRORS - 1)
            errors = [*errors[: MAX_ERRORS - 1], f"... and {more} more problems"]
        super().__init__("\n".join(errors))
        self.errors = errors


class Validator:
    """Collects every error instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = shown_path(source)
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        # The path holds keys from the file: clip them like any other value from it.
        self.errors.append(f"{self.source}: {one_line(path, 2 * MAX_SHOWN_CHARS)}: {message}")

    def mapping(self, value: object, path: str) -> Mapping[Any, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {show(value)}")
            return None
        return value

    def unknown_keys(self, section: Mapping[Any, Any], known: Collection[str], path: str) -> None:
        for key in section:
            if key not in known:
                name = one_line(str(key), MAX_SHOWN_CHARS)
                where = f"{path}.{name}" if path else name
                self.error(where, f"unknown key (known: {', '.join(sorted(known))})")

    def number(self, value: object, path: str, low: float, high: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(
                path, f"expected a number between {_n(low)} and {_n(high)}, got {show(value)}"
            )
            return None
        if not low <= value <= high:
            self.error(
                path, f"expected a number between {_n(low)} and {_n(high)}, got {show(value)}"
            )
            return None
        return float(value)

    def duration(self, value: object, path: str, low: float, high: float) -> float | None:
        """Seconds from a number or a duration string (``"15s"``, ``"1m30s"``)."""
        seconds = parse_seconds(value)
        if seconds is None or not low <= seconds <= high:
            self.error(
                path,
                f"expected a number between {_n(low)} and {_n(high)} seconds or a duration "
                f'such as "15s", "1m", "100ms" or "1h30m", got {show(value)}',
            )
            return None
        return seconds

    def integer(self, value: object, path: str, low: int, high: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.error(path, f"expected a whole number between {low} and {high}, got {show(value)}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {show(value)}")
            return None
        return value

    def choice(self, value: object, path: str, choices: tuple[str, ...]) -> str | None:
        if not isinstance(value, str) or value not in choices:
            self.error(path, f"expected one of {', '.join(choices)}, got {show(value)}")
            return None
        return value

    def string(self, value: object, path: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.error(path, f"expected a non-empty string, got {show(value)}")
            return None
        return value

    def file_path(self, value: object, path: str) -> str | None:
        """A non-empty string the OS can take as a path (no NUL byte)."""
        text = self.string(value, path)
        if text is not None and "\0" in text:
            self.error(path, f"a path cannot contain a NUL byte, got {show(text)}")
            return None
        return text


def show(value: object) -> str:
    """A value from a file or flag for an error message: one line, at most ~MAX_SHOWN_CHARS."""
    if isinstance(value, str):
        return f'"{one_line(value, MAX_SHOWN_CHARS)}"'
    if value is None:
        return "nothing"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_SHOWN_CHARS:
        # repr() of a huge int is slow and, past 4300 digits, an error.
        return f"a {value.bit_length()}-bit number"
    # Never a plain repr() of a container: it may be huge (an alias bomb once printed 312 MB).
    return one_line(_short_repr().repr(value), MAX_SHOWN_CHARS)


def one_line(text: str, limit: int) -> str:
    """``text`` with control characters escaped, clipped to about ``limit`` characters."""
    clipped = terminal(text[:limit])
    if len(text) > limit or len(clipped) > limit:
        return f"{clipped[:limit]}... ({len(text)} characters)"
    return clipped


def shown_path(path: str) -> str:
    """A file name for an error message: one line, bounded (PATH_MAX is 4096)."""
    return one_line(path, MAX_SHOWN_PATH_CHARS)


def _n(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# -- durations ------------------------------------------------------------------------------------


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration string (``"1s"``, ``"100ms"``, ``"1h30m"``, ``"0"``); None if
    it is not one. This is the web config's syntax, as exporter-toolkit reads it."""
    if text == "0":
        return 0.0
    if len(text) > _MAX_DURATION_CHARS:
        return None
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total if position == len(text) and position > 0 else None


def parse_seconds(value: object) -> float | None:
    """Seconds from a config value or flag: a number, a bare number as text (``"15"``), or a
    duration string (``"15s"``, ``"100ms"``, ``"1h30m"``). None if it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_DURATION_CHARS:
            return None
        if _BARE_SECONDS.fullmatch(text):
            seconds = float(text)
        else:
            parsed = parse_duration(text)
            if parsed is None:
                return None
            seconds = parsed
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# -- bounded file reading and YAML ----------------------------------------------------------------


def read_config_file(path: str, what: str) -> str:
    """The UTF-8 text of a configuration file; ConfigError (one line) if it cannot be one.

    ``what`` names the file in messages ("configuration file", "web config file"). Only regular
    files of at most MAX_FILE_BYTES are read; anything else is refused after fstat() and before
    any read, and the open never blocks (O_NONBLOCK: a FIFO without a writer opens at once).
    """
    shown = shown_path(path)
    if "\0" in path:
        raise ConfigError([f"{shown}: cannot read the {what}: the path contains a NUL byte"])
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.ENAMETOOLONG:
            reason = f"the path is too long ({len(path)} characters)"
        raise ConfigError([f"{shown}: cannot read the {what}: {reason}"]) from None
    try:
        try:
            info = os.fstat(fd)
            kind = _file_kind(info.st_mode)
            if kind is not None:
                raise ConfigError([f"{shown}: cannot read the {what}: it is {kind}, not a file"])
            if info.st_size > MAX_FILE_BYTES:
                raise ConfigError([_too_big(shown, what, info.st_size)])
            data = _read_at_most(fd, MAX_FILE_BYTES + 1)
        except OSError as error:
            reason = error.strerror or str(error)
            raise ConfigError([f"{shown}: cannot read the {what}: {reason}"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # grew after fstat, or a /proc-like file reporting size 0
        raise ConfigError([_too_big(shown, what, len(data))])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = f"{shown}: not UTF-8 text (byte {error.start}); is this the YAML {what}?"
        raise ConfigError([problem]) from None


def check_regular_file(path: str) -> str | None:
    """Why ``path`` cannot be read as a regular file (one phrase), or None if it can.

    For files handed to other readers (TLS certificates and keys): they are checked the same
    non-blocking way, so a FIFO named as a certificate cannot hang a reload either.
    """
    if "\0" in path:
        return "the path contains a NUL byte"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        return error.strerror or str(error)
    try:
        kind = _file_kind(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return None if kind is None else f"it is {kind}, not a file"


def _file_kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _too_big(shown: str, what: str, size: int) -> str:
    return (
        f"{shown}: the {what} is larger than {MAX_FILE_BYTES // 1024} KiB ({size} bytes or "
        "more); is this the right file?"
    )


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(65536, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
