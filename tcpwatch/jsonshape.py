"""Parsing and checking a JSON document that came from elsewhere (a daemon read with ``--from``).

:func:`parse_bounded` refuses a body before ``json.loads`` builds it when it would be too costly:
more values than any real answer holds (each container and each comma is at least one object, so
counting them bounds memory whatever the body's size), NaN and Infinity, numbers Python cannot
hold, nesting deep enough to overflow the parser's stack.

:class:`Shape` then walks the parsed value, checking each field's type as it is read; the first
mismatch is a :class:`ShapeError` whose message is one line naming the field's path and what it
held (``findings[3].severity: expected one of critical, warning, info, got ['x']``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator
from typing import Any

from tcpwatch.validation import show

# Commas, brackets and braces: a 10,000-finding report (the API's largest page) has about
# 200,000; each costs at least one Python object (~30-60 bytes) once parsed.
MAX_JSON_VALUES = 1_000_000
MAX_INTEGER = 2**63  # counts and PIDs; anything larger is not from tcpwatch


class ShapeError(ValueError):
    """The document is not what was expected: one line, the field's path first."""


def _refuse_constant(name: str) -> float:
    raise ShapeError(f"{name} is not a JSON number")


def parse_bounded(body: bytes) -> Any:
    """``json.loads(body)``, refused (ShapeError) before parsing when it holds more than
    MAX_JSON_VALUES values, and after when it is not JSON, nests too deeply or holds NaN."""
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > MAX_JSON_VALUES:
        raise ShapeError(f"more than {MAX_JSON_VALUES:,} JSON values ({values:,} or so)")
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise ShapeError("nested too deeply") from None
    except UnicodeDecodeError as error:
        raise ShapeError(f"not UTF-8 text (byte {error.start})") from None
    except ValueError as error:  # JSONDecodeError, and int() of more than 4300 digits
        if isinstance(error, ShapeError):
            raise
        raise ShapeError(f"not JSON ({str(error).splitlines()[0][:120]})") from None


class Shape:
    """A value at a path in a parsed document, read with its type checked."""

    __slots__ = ("path", "value")

    def __init__(self, value: object, path: str = "") -> None:
        self.value = value
        self.path = path

    def fail(self, expected: str) -> ShapeError:
        where = self.path or "the document"
        return ShapeError(f"{where}: expected {expected}, got {show(self.value)}")

    def _child(self, key: str | int, value: object) -> Shape:
        if isinstance(key, int):
            return Shape(value, f"{self.path}[{key}]")
        return Shape(value, f"{self.path}.{key}" if self.path else key)

    # -- containers ------------------------------------------------------------------------------

    def is_null(self) -> bool:
        return self.value is None

    def field(self, key: str, required: bool = True) -> Shape:
        """The member ``key`` of an object; absent is an error when ``required``, else null."""
        if not isinstance(self.value, dict):
            raise self.fail("an object")
        if key not in self.value and required:
            raise ShapeError(f"{self._child(key, None).path}: missing")
        return self._child(key, self.value.get(key))

    def items(self) -> Iterator[Shape]:
        if not isinstance(self.value, list):
            raise self.fail("a list")
        return (self._child(index, item) for index, item in enumerate(self.value))

    def members(self) -> Iterator[tuple[str, Shape]]:
        """An object's (key, value) pairs."""
        if not isinstance(self.value, dict):
            raise self.fail("an object")
        return ((key, self._child(key, item)) for key, item in self.value.items())

    # -- scalars ---------------------------------------------------------------------------------

    def string(self) -> str:
        if not isinstance(self.value, str):
            raise self.fail("a string")
        return self.value

    def optional_string(self) -> str | None:
        return None if self.value is None else self.string()

    def choice(self, choices: Collection[str]) -> str:
        if not isinstance(self.value, str) or self.value not in choices:
            raise self.fail(f"one of {', '.join(choices)}")
        return self.value

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail("true or false")
        return self.value

    def integer(self) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_INTEGER:
            raise self.fail("a whole number")
        return value

    def optional_integer(self) -> int | None:
        return None if self.value is None else self.integer()

    def number(self) -> float:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail("a number")
        if not math.isfinite(value) or abs(value) > MAX_INTEGER:
            raise self.fail("a finite number")
        return float(value)

    def optional_number(self) -> float | None:
        return None if self.value is None else self.number()

    def scalar(self) -> str | int | float:
        """A string or a number (evidence values)."""
        if isinstance(self.value, str):
            return self.value
        if isinstance(self.value, int) and not isinstance(self.value, bool):
            return self.integer()
        return self.number()

    def strings(self) -> list[str]:
        return [item.string() for item in self.items()]
