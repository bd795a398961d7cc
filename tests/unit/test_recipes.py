"""The recipes of docs/architecture.md, followed in a copy of the project: no hub file.

A toy per-poll source with one metric, a toy long-lived source and a toy rule are added to a
temporary copy, each exactly as its recipe says. After each, the checks that read the registries
(golden exposition, docs rows, family and source registries, layers, rule catalogue and pages)
and the toy's own test must pass there, tcpwatch must export or judge the toy through its
ordinary entry points, and the files that changed must be exactly the recipe's **Touches:**
list: a recipe that needed one more file (a list kept by hand somewhere) fails here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COPIED = (
    "tcpwatch",
    "docs",
    "tests",
    "deploy",
    "README.md",
    "pyproject.toml",
    "config.example.yaml",
)
FIXTURE_PROC = "tests/fixtures/proc"
RUN_TIMEOUT = 300.0

# Two polls of the copy through the Pipeline serve and check use (long-lived sources started,
# drained by each poll, stopped), the kernel's own sources off: the toys read the fixture
# procfs. Prints the second state's exposition, then the ids of its findings.
POLL = """
import sys
from tcpwatch.config import CollectSettings, Config
from tcpwatch.pipeline import Pipeline
from tcpwatch.render.prometheus import render

kernel = ("sockdiag", "processes", "owners", "lifecycle")
config = Config(
    procfs=sys.argv[1], rootfs=sys.argv[2], collect=CollectSettings(disabled_sources=kernel)
)
pipeline = Pipeline(log_failures=False)
try:
    pipeline.poll(config)
    state = pipeline.poll(config)
finally:
    pipeline.close()
sys.stdout.write(render(state, include_process=False).decode())
print("findings:", " ".join(finding.rule_id for finding in state.findings))
"""


# -- the toy per-poll source ----------------------------------------------------------------------

TOY_SOURCE = '''"""A toy source: TCP sockets in use, from /proc/net/sockstat (test_recipes.py)."""

from __future__ import annotations

from tcpwatch.model import Snapshot
from tcpwatch.paths import read_text
from tcpwatch.readings.toy import ToyReading
from tcpwatch.sources.base import SourceContext, netns_source


def parse_toy(text: str) -> ToyReading:
    """"TCP: inuse 3 orphan 0 ..." -> ToyReading(3)."""
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["TCP:", "inuse"]:
            return ToyReading(int(words[2]))
    raise ValueError("no TCP line")


@netns_source("toy", field="toy", order=25)
def read_toy_source(context: SourceContext, so_far: Snapshot) -> ToyReading:
    return parse_toy(read_text(context.paths.net("sockstat")))
'''

TOY_MODEL = '''"""What the toy source read (tests/unit/test_recipes.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToyReading:
    """The toy source of tests/unit/test_recipes.py: TCP sockets in use."""

    tcp_inuse: int
'''

TOY_FAMILY = '''"""Families of the toy source."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from tcpwatch.render.families.base import NETNS, family, gauge
from tcpwatch.state import ExportState


@family(source="toy", order=45)
def toy_family(state: ExportState) -> Iterator[Metric]:
    inuse = gauge("tcpwatch_toy_tcp_inuse", "TCP sockets in use (a toy).", NETNS, state)
    for snap in state.snapshots:
        if snap.toy is not None:
            inuse.add_metric([snap.netns], snap.toy.tcp_inuse)
    yield inuse
'''

TOY_TEST = """from tcpwatch.readings.toy import ToyReading
from tcpwatch.sources.toy import parse_toy


def test_parse_toy() -> None:
    assert parse_toy("sockets: used 4\\nTCP: inuse 3 orphan 0\\n") == ToyReading(3)
"""

TOY_DOCS = """
## Toy

| metric | type | labels | meaning |
|---|---|---|---|
| `tcpwatch_toy_tcp_inuse` | gauge | netns | TCP sockets in use |

```
tcpwatch_toy_tcp_inuse{netns="host"} 3.0
```
"""

# -- the toy long-lived source --------------------------------------------------------------------

TICKS_SOURCE = '''"""A toy long-lived source: counts its drains (tests/unit/test_recipes.py)."""

from __future__ import annotations

import os

from tcpwatch.model import Snapshot
from tcpwatch.readings.toy_ticks import ToyTicks
from tcpwatch.sources.base import SourceContext, long_lived_source


class TicksGatherer:
    def __init__(self) -> None:
        self._read, self._write = os.pipe()  # never written: the gathering thread stays idle
        self._drains = 0

    def fileno(self) -> int:
        return self._read

    def read_ready(self) -> None:
        os.read(self._read, 512)

    def drain(self, so_far: Snapshot) -> ToyTicks:
        self._drains += 1
        return ToyTicks(self._drains)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@long_lived_source("toy_ticks", field="toy_ticks", order=95)
def start_toy_ticks(context: SourceContext) -> TicksGatherer:
    return TicksGatherer()
'''

TICKS_MODEL = '''"""What the toy long-lived source counted (tests/unit/test_recipes.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToyTicks:
    """The toy long-lived source of tests/unit/test_recipes.py: drains so far."""

    drains: int
'''

TICKS_FAMILY = '''"""Families of the toy long-lived source."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from tcpwatch.render.families.base import NETNS, counter, family
from tcpwatch.state import ExportState


@family(source="toy_ticks", order=55)
def toy_ticks_family(state: ExportState) -> Iterator[Metric]:
    drains = counter("tcpwatch_toy_ticks_drains", "Drains of the toy gatherer.", NETNS)
    for snap in state.snapshots:
        if snap.toy_ticks is not None:
            drains.add_metric([snap.netns], snap.toy_ticks.drains)
    yield drains
'''

TICKS_TEST = """from tcpwatch.readings.toy_ticks import ToyTicks
from tcpwatch.sources.toy_ticks import TicksGatherer


def test_each_drain_counts() -> None:
    gatherer = TicksGatherer()
    try:
        drains = [gatherer.drain(None), gatherer.drain(None)]  # type: ignore[arg-type]
        assert drains == [ToyTicks(1), ToyTicks(2)]
    finally:
        gatherer.close()
"""

TICKS_DOCS = """
| metric | type | labels | meaning |
|---|---|---|---|
| `tcpwatch_toy_ticks_drains_total` | counter | netns | drains of the toy gatherer |

```
tcpwatch_toy_ticks_drains_total{netns="host"} 2.0
```
"""

# -- the toy rule ---------------------------------------------------------------------------------

TOY_RULE = '''"""T rules: a toy topic over the toy source (tests/unit/test_recipes.py)."""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.rules.base import Finding, Threshold, Thresholds, Window, required, rule
from tcpwatch.rules.shared import listener_groups


@rule(
    "T01",
    "toy-inuse",
    "info",
    "TCP sockets in use (a toy)",
    thresholds=(Threshold("minimum", 1, 0, 1e9, "sockets", "sockets in use to report"),),
)
def T01(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    toy = window.current.toy
    if toy is None or toy.tcp_inuse < required(thresholds, "minimum"):
        return
    evidence = {"tcp_inuse": toy.tcp_inuse, "listeners": len(listener_groups(window.current))}
    yield T01.finding(window, f"{toy.tcp_inuse} TCP sockets in use", evidence, "Nothing: a toy.")
'''

TOY_RULE_PAGE = """# T01 toy-inuse

**Severity:** info when `rules.T01.minimum` TCP sockets or more are in use.

## What it detects

TCP sockets in use, from the toy source (tests/unit/test_recipes.py).

## Why it matters

It proves the rule recipe of docs/architecture.md.

## How to fix

Nothing.

## Verify

`tcpwatch check --format json`.

## Evidence

| key | meaning |
|---|---|
| `tcp_inuse` | TCP sockets in use |
| `listeners` | listening address:ports |
"""

TOY_RULE_TEST = """from dataclasses import replace

from tcpwatch.readings.toy import ToyReading
from tcpwatch.rules import RuleSettings, Window, evaluate
from tests.unit.snapshots import snapshot, window


def busy() -> Window:
    return window(replace(snapshot(), toy=ToyReading(5)))


def test_t01_fires_with_sockets_in_use_and_not_without_the_toy_source() -> None:
    (finding,) = [f for f in evaluate(busy(), {}) if f.rule_id == "T01"]
    assert finding.evidence["tcp_inuse"] == 5
    assert [f for f in evaluate(window(snapshot()), {}) if f.rule_id == "T01"] == []


def evidence_scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    return [(busy(), {})]
"""


# -- following a recipe ---------------------------------------------------------------------------


def touches(recipe: str, **names: str) -> set[str]:
    """The files a recipe of docs/architecture.md says it touches, its placeholders filled."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split(f"### {recipe}\n", 1)[1].split("\n### ", 1)[0]
    listed = re.search(r"\*\*Touches:\*\*(.*?)(?:\n\n|$)", section, re.S)
    assert listed, f"the recipe {recipe!r} has no **Touches:** line"
    paths = set(re.findall(r"`([^`\s]+)`", listed.group(1)))
    for placeholder, value in names.items():
        paths = {path.replace(f"<{placeholder}>", value) for path in paths}
    assert not [p for p in paths if "<" in p], paths
    return paths


def digests(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    assert not path.exists(), f"{relative} exists already"
    path.write_text(text)


def insert(root: Path, relative: str, anchor: str, text: str) -> None:
    """``text`` put before the one occurrence of ``anchor``."""
    path = root / relative
    content = path.read_text()
    assert content.count(anchor) == 1, f"{relative}: {anchor!r} is not there once"
    path.write_text(content.replace(anchor, text + anchor))


def add_snapshot_field(root: Path, source: str, dataclass_text: str, field: str) -> None:
    """The source's data module, its dataclass imported by model.py for a new Snapshot field."""
    write(root, f"tcpwatch/readings/{source}.py", dataclass_text)
    name = re.findall(r"^class (\w+):", dataclass_text, re.M)[-1]
    anchor = "from tcpwatch.stalls import"
    insert(root, "tcpwatch/model.py", anchor, f"from tcpwatch.readings.{source} import {name}\n")
    insert(
        root, "tcpwatch/model.py", "    def source_ok(self, name: str) -> bool:", f"    {field}\n\n"
    )


def append(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.write_text(path.read_text() + text)


def insert_table_row(root: Path, relative: str, last_row_start: str, row: str) -> None:
    """``row`` after the table row that starts with ``last_row_start``."""
    path = root / relative
    lines = path.read_text().splitlines(keepends=True)
    (index,) = [i for i, line in enumerate(lines) if line.startswith(last_row_start)]
    lines.insert(index + 1, row + "\n")
    path.write_text("".join(lines))


class Copy:
    """A copy of the project in which the toys are added and tcpwatch and its tests are run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(source, root / name, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(source, root / name)
        self.empty_rootfs = root.parent / "rootfs"
        self.empty_rootfs.mkdir()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TCPWATCH_")}
        env["PYTHONPATH"] = str(self.root)
        env.update(extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.root,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )

    def pytest(self, *tests: str, **extra: str) -> None:
        result = self.run("-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, **extra)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    def poll(self) -> str:
        result = self.run("-c", POLL, FIXTURE_PROC, str(self.empty_rootfs))
        assert result.returncode == 0, result.stderr
        return result.stdout

    def regenerate_golden(self) -> None:
        golden = "tests/unit/test_exposition_golden.py::test_exposition_matches_golden_file"
        self.pytest(golden, TCPWATCH_UPDATE_GOLDEN="1")


SOURCE_CHECKS = (
    "tests/unit/test_exposition_golden.py",
    "tests/unit/test_family_registry.py",
    "tests/unit/test_source_registry.py",
    "tests/unit/test_architecture.py",
    "tests/unit/test_config.py",
)
RULE_CHECKS = (
    "tests/unit/test_rules_engine.py",
    "tests/unit/test_rules_docs.py",
    "tests/unit/test_config.py",
    "tests/unit/test_architecture.py",
    "tests/unit/test_cli.py::test_rules_lists_every_rule_with_its_thresholds",
)


@pytest.fixture
def copy(tmp_path: Path) -> Copy:
    return Copy(tmp_path / "tcpwatch-copy")


def add_toy_source(copy: Copy) -> None:
    """The per-poll source recipe, step by step."""
    root = copy.root
    write(root, "tcpwatch/sources/toy.py", TOY_SOURCE)
    add_snapshot_field(root, "toy", TOY_MODEL, "toy: ToyReading | None = None")
    write(root, "tcpwatch/render/families/toy.py", TOY_FAMILY)
    append(root, "docs/metrics.md", TOY_DOCS)
    write(root, "tests/unit/test_toy.py", TOY_TEST)
    copy.regenerate_golden()


def test_a_source_read_every_poll_touches_only_what_its_recipe_lists(copy: Copy) -> None:
    before = digests(copy.root)
    add_toy_source(copy)
    recipe = touches("Add a source that is read every poll", name="toy")
    assert changed(before, digests(copy.root)) == recipe

    copy.pytest("tests/unit/test_toy.py", *SOURCE_CHECKS)
    golden = (copy.root / "tests/golden/metrics.prom").read_text()
    assert "# TYPE tcpwatch_toy_tcp_inuse gauge" in golden
    exposed = copy.poll()
    sockstat = (REPO / FIXTURE_PROC / "net" / "sockstat").read_text()
    inuse = re.search(r"^TCP: inuse (\d+)", sockstat, re.M)
    assert inuse is not None
    sample = rf'^tcpwatch_toy_tcp_inuse{{netns="[^"]*"}} {inuse.group(1)}\.0$'
    assert re.search(sample, exposed, re.M), exposed
    assert re.search(r'^tcpwatch_source_up{netns="[^"]*",source="toy"} 1\.0$', exposed, re.M)


def test_a_long_lived_source_touches_only_what_its_recipe_lists(copy: Copy) -> None:
    before = digests(copy.root)
    root = copy.root
    write(root, "tcpwatch/sources/toy_ticks.py", TICKS_SOURCE)
    add_snapshot_field(root, "toy_ticks", TICKS_MODEL, "toy_ticks: ToyTicks | None = None")
    write(root, "tcpwatch/render/families/toy_ticks.py", TICKS_FAMILY)
    append(root, "docs/metrics.md", TICKS_DOCS)
    write(root, "tests/unit/test_toy_ticks.py", TICKS_TEST)
    copy.regenerate_golden()
    recipe = touches("Add a long-lived source", name="toy_ticks")
    assert changed(before, digests(root)) == recipe

    copy.pytest("tests/unit/test_toy_ticks.py", *SOURCE_CHECKS)
    exposed = copy.poll()
    sample = r'^tcpwatch_toy_ticks_drains_total{netns="[^"]*"} 2\.0$'
    assert re.search(sample, exposed, re.M), exposed


def test_a_rule_touches_only_what_its_recipe_lists(copy: Copy) -> None:
    add_toy_source(copy)  # the field the rule reads
    before = digests(copy.root)
    root = copy.root
    write(root, "tcpwatch/rules/toy.py", TOY_RULE)
    write(root, "docs/rules/T01-toy-inuse.md", TOY_RULE_PAGE)
    row = "| T01 | toy-inuse | TCP sockets in use (a toy) |"
    insert_table_row(root, "README.md", "| P02 |", row)
    index_row = "| [T01](T01-toy-inuse.md) | toy-inuse | info | TCP sockets in use (a toy) |"
    insert_table_row(root, "docs/rules/README.md", "| [P02](", index_row)
    write(root, "tests/unit/test_rules_toy.py", TOY_RULE_TEST)
    recipe = touches("Add a rule", topic="toy", ID="T01", slug="toy-inuse")
    assert changed(before, digests(root)) == recipe

    copy.pytest("tests/unit/test_rules_toy.py", *RULE_CHECKS)
    findings = copy.poll().rpartition("findings:")[2].split()
    assert "T01" in findings, findings
    assert copy.run("-m", "tcpwatch", "rules", "T01").stdout == TOY_RULE_PAGE
