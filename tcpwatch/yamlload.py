"""YAML for configuration files, bounded: no aliases, at most MAX_YAML_NODES values nested at most
MAX_YAML_DEPTH deep. Imported only when a file is read (config.py and http/webconfig.py import it
there), so commands that read none start without PyYAML."""

from __future__ import annotations

import yaml

from tcpwatch.validation import (
    MAX_SHOWN_CHARS,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    ConfigError,
    one_line,
    shown_path,
)


class _Refused(yaml.YAMLError):
    def __init__(self, problem: str, mark: object) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and stops at a node and depth budget while composing,
    before anything is expanded or constructed: a 470-byte alias bomb fails at its first ``*``.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                "aliases (*name) are not allowed in tcpwatch's configuration: write the value "
                "out in full",
                event.start_mark,
            )
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES} values", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, source: str) -> object:
    """Parse one YAML document within the bounds above; ConfigError (one line) if it fails."""
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # checks the characters already: ReaderError
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = getattr(mark, "line", None)
        where = f"line {line + 1}" if isinstance(line, int) else "?"
        problem = getattr(error, "problem", None) or (str(error).splitlines() or ["?"])[0]
        reason = one_line(str(problem), 2 * MAX_SHOWN_CHARS)
        kind = "" if isinstance(error, _Refused) else "not valid YAML: "
        message = f"{shown_path(source)}: {where}: {kind}{reason}"
        raise ConfigError([message]) from None
    except (ValueError, OverflowError, RecursionError) as error:
        # Constructors of YAML's own types: "2001-13-45" as a date, an int of 5000 digits.
        reason = one_line(str(error) or type(error).__name__, 2 * MAX_SHOWN_CHARS)
        raise ConfigError([f"{shown_path(source)}: {reason}"]) from None
    finally:
        if loader is not None:
            loader.dispose()
