"""Checks shared by the configuration files: each problem becomes one line naming the file and
the key path (``config.yaml: rules.Q01.warning: expected a number between 0 and 1, got "high"``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


class Validator:
    """Collects every error instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{self.source}: {path}: {message}")

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
                where = f"{path}.{key}" if path else str(key)
                self.error(where, f"unknown key (known: {', '.join(sorted(known))})")

    def number(self, value: object, path: str, low: float, high: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(
                path, f"expected a number between {_n(low)} and {_n(high)}, got {show(value)}"
            )
            return None
        if not low <= value <= high:
            self.error(path, f"expected a number between {_n(low)} and {_n(high)}, got {value}")
            return None
        return float(value)

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


def show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "nothing"
    return repr(value)


def _n(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
