"""Static checks of the Grafana dashboard (deploy/grafana/tcpwatch.json) and its provisioning.

Every panel query must parse as PromQL (``promtool check rules`` on a rule file built from the
queries), name only the metrics and labels docs/metrics.md documents, filter by the ``instance``
and ``netns`` template variables, and compute rates over ``$__rate_interval``. The end-to-end
test (tests/integration/test_prometheus_e2e.py) runs the same queries against a real Prometheus
and requires data from each; the helpers it shares live here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcpwatch.model import MULTI_FIELD_SUFFIXES

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "tcpwatch.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
METRICS_DOC = REPO / "docs" / "metrics.md"
DASHBOARDS_DOC = REPO / "docs" / "dashboards.md"
# The rows whose panels show one part of docs/metrics.md: a panel all of whose metrics are
# documented in such a section belongs in its row (Grafana gives a panel to the row above it).
ROW_OF_SECTION: Mapping[str, str] = {
    "Sockets": "Sockets",
    "Listeners": "Listeners",
    "Ephemeral ports": "Ephemeral ports",
    "Connections: outcomes, retransmissions, RTT": "Connection quality",
    "Tunables": "Tunables",
    "Findings": "Findings",
    "Network namespaces": "tcpwatch itself",
    "tcpwatch itself": "tcpwatch itself",
    "Who is slow": "Who is slow",
}
SUMMARY_ROW = "Overview"  # its stat panels summarise every part
RUNBOOK_BASE = "https://github.com/OWNER/tcpwatch/blob/main/"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})
# Values for Grafana's variables when a query is parsed or run outside Grafana.
PARSE_VALUES: Mapping[str, str] = {
    "instance": "127.0.0.1:9477",
    "netns": "host",
    "peer": ".+",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}
RATE_FUNCTIONS = frozenset({"rate", "irate", "increase"})
AGGREGATIONS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile",
    }
)  # fmt: skip
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2"})
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


# -- the dashboard ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PanelQuery:
    panel: str  # the panel's title
    ref_id: str
    expr: str  # as written, variables unsubstituted

    def __str__(self) -> str:
        return f"panel {self.panel!r} query {self.ref_id}"


@cache
def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as handle:
        dashboard: dict[str, Any] = json.load(handle)
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def template_variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana's ``$name``, ``${name}`` and ``[[name]]`` with ``values[name]``.

    >>> substitute('rate(x{instance=~"$instance"}[$__rate_interval])', PARSE_VALUES)
    'rate(x{instance=~"127.0.0.1:9477"}[1m])'
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)", replace, expr)


# -- a small PromQL reader: which series a query selects, and how ---------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)
    range: str | None  # "[5m]" when it is a range selector
    function: str | None  # the innermost function or aggregation around it

    def matcher(self, label: str) -> tuple[str, str] | None:
        """(operator, value) of the first matcher on ``label``."""
        for name, operator, value in self.matchers:
            if name == label:
                return operator, value
        return None


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(
                f"cannot read PromQL at {expr[position : position + 20]!r} in {expr!r}"
            )
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def _unquote(literal: str) -> str:
    if literal.startswith("`"):
        return literal[1:-1]
    return re.sub(r"\\(.)", r"\1", literal[1:-1])


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of a PromQL expression, each with its matchers, range and function.

    >>> [s.metric for s in selectors('sum by (netns) (rate(a_total{netns="x"}[5m])) / b')]
    ['a_total', 'b']
    """
    tokens = _tokens(expr)
    found: list[Selector] = []
    functions: list[str | None] = []  # one entry per open parenthesis
    pending: str | None = None  # an aggregation waiting for its "(" after a by/without list
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "ident" and text in LABEL_LIST_KEYWORDS:
            index += 1
            if following == "(":
                while tokens[index][1] != ")":
                    index += 1
                index += 1
            continue
        if kind == "ident" and text in AGGREGATIONS:
            pending = text
            index += 1
            continue
        if kind == "ident" and following == "(":
            pending = text
            index += 1
            continue
        if kind == "op" and text == "(":
            functions.append(pending)
            pending = None
        elif kind == "op" and text == ")":
            functions.pop()
        elif kind == "ident" and text not in KEYWORDS:
            matchers: list[tuple[str, str, str]] = []
            index += 1
            if index < len(tokens) and tokens[index][1] == "{":
                index += 1
                while tokens[index][1] != "}":
                    label, operator, value = tokens[index : index + 3]
                    matchers.append((label[1], operator[1], _unquote(value[1])))
                    index += 3
                    if tokens[index][1] == ",":
                        index += 1
                index += 1
            range_text = None
            if index < len(tokens) and tokens[index][0] == "range":
                range_text = tokens[index][1]
                index += 1
            innermost = next((name for name in reversed(functions) if name is not None), None)
            direct = functions[-1] if functions else None
            found.append(Selector(text, tuple(matchers), range_text, direct or innermost))
            continue
        index += 1
    return found


# -- what docs/metrics.md documents ------------------------------------------------------------

_TYPES = frozenset({"gauge", "counter", "histogram"})


@cache
def documented_metrics() -> dict[str, frozenset[str]]:
    """tcpwatch metric name -> its labels, from the tables of docs/metrics.md.

    The kernel-counter table (``| `tcpwatch_listen_overflows_total` | TcpExtListenOverflows |``)
    has no label column: those counters carry ``netns`` only. A histogram adds its ``_bucket``
    (with ``le``), ``_sum`` and ``_count`` series.
    """
    metrics: dict[str, frozenset[str]] = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(tcpwatch_\w+)`", cells[0]) if line.startswith("|") else None
        if match is None:
            continue
        name = match.group(1)
        if len(cells) >= 3 and cells[1] in _TYPES:
            labels = frozenset(label.strip() for label in cells[2].split(",") if label.strip())
            metrics[name] = labels
            if cells[1] == "histogram":
                metrics[f"{name}_bucket"] = labels | {"le"}
                metrics[f"{name}_sum"] = labels
                metrics[f"{name}_count"] = labels
        else:
            metrics[name] = frozenset({"netns"})
    return metrics


@cache
def documented_sysctls() -> frozenset[str]:
    """Values of ``tcpwatch_sysctl``'s ``name`` label that docs/metrics.md lists as read.

    Multi-valued sysctls are exported once per field, with the suffixes the exporter uses.
    """
    text = METRICS_DOC.read_text(encoding="utf-8")
    match = re.search(r"Read: (.*?)\.\n", text, re.DOTALL)
    if match is None:
        raise AssertionError(f"{METRICS_DOC}: no 'Read: ...' list of sysctls")
    names: set[str] = set()
    for word in match.group(1).replace("\n", " ").split(","):
        name = word.strip()
        if not name.startswith("net."):
            name = f"net.ipv4.{name}"
        suffixes = MULTI_FIELD_SUFFIXES.get(name)
        if suffixes:
            names.update(f"{name}.{suffix}" for suffix in suffixes)
        else:
            names.add(name)
    return frozenset(names)


@cache
def host_only_sysctls() -> frozenset[str]:
    """Sysctls docs/metrics.md says exist only in the host's namespace (one value for all).

    Parsed from: "`net.ipv4.tcp_mem`, `tcp_max_orphans` and `net.core.netdev_max_backlog`
    exist only in the host's namespace"; multi-valued ones expand to their fields.
    """
    text = " ".join(METRICS_DOC.read_text(encoding="utf-8").split())
    match = re.search(r"((?:`[^`]+`,? (?:and )?)+)exist only in the host's namespace", text)
    if match is None:
        raise AssertionError(f"{METRICS_DOC}: no sentence naming the host-only sysctls")
    names: set[str] = set()
    for quoted in re.findall(r"`([^`]+)`", match.group(1)):
        name = quoted if quoted.startswith("net.") else f"net.ipv4.{quoted}"
        suffixes = MULTI_FIELD_SUFFIXES.get(name)
        if suffixes:
            names.update(f"{name}.{suffix}" for suffix in suffixes)
        else:
            names.add(name)
    return frozenset(names)


def selects_host_only_sysctls(selector: Selector) -> bool:
    """A ``tcpwatch_sysctl`` selector whose names all exist only in the host's namespace."""
    name = selector.matcher("name")
    if selector.metric != "tcpwatch_sysctl" or name is None:
        return False
    values = name[1].split("|") if name[0] == "=~" else [name[1]]
    return set(values) <= host_only_sysctls()


def undocumented_use(expr: str) -> list[str]:
    """Problems with the metrics and labels an expression uses, measured against the docs."""
    problems = []
    documented = documented_metrics()
    for selector in selectors(expr):
        if selector.metric == "up":
            labels: frozenset[str] = frozenset()
        elif selector.metric in documented:
            labels = documented[selector.metric]
        else:
            problems.append(f"metric {selector.metric} is not in docs/metrics.md")
            continue
        for label, operator, value in selector.matchers:
            if label not in labels | TARGET_LABELS:
                problems.append(f"{selector.metric} has no label {label!r}")
            if selector.metric == "tcpwatch_sysctl" and label == "name":
                unknown = unknown_sysctls(operator, value)
                if unknown:
                    problems.append(f"tcpwatch_sysctl name(s) {unknown} are not documented")
    return problems


def unknown_sysctls(operator: str, value: str) -> list[str]:
    """Names (or, for a regex, top-level alternatives) that match no documented sysctl.

    >>> unknown_sysctls("=~", "net.core.somaxconn|net.core.somaxcon")
    ['net.core.somaxcon']
    """
    documented = documented_sysctls()
    if operator in ("=", "!="):
        return [] if value in documented else [value]
    alternatives, depth, start = [], 0, 0
    for position, character in enumerate(value):
        depth += {"(": 1, ")": -1}.get(character, 0)
        if character == "|" and depth == 0:
            alternatives.append(value[start:position])
            start = position + 1
    alternatives.append(value[start:])
    return [
        alternative
        for alternative in alternatives
        if not any(re.fullmatch(alternative, name) for name in documented)
    ]


# -- tests -------------------------------------------------------------------------------------


def test_metrics_doc_parses_into_the_documented_families() -> None:
    metrics = documented_metrics()
    assert metrics["tcpwatch_sockets"] == {"netns", "family", "state"}
    assert metrics["tcpwatch_listen_overflows_total"] == {"netns"}
    assert metrics["tcpwatch_poll_duration_seconds_bucket"] == {"le"}
    assert metrics["tcpwatch_last_poll_timestamp_seconds"] == frozenset()
    assert {"net.core.somaxconn", "net.ipv4.ip_local_port_range.min"} <= documented_sysctls()
    assert host_only_sysctls() == {
        "net.ipv4.tcp_mem.min",
        "net.ipv4.tcp_mem.pressure",
        "net.ipv4.tcp_mem.max",
        "net.ipv4.tcp_max_orphans",
        "net.core.netdev_max_backlog",
    }


def test_selector_reader() -> None:
    found = selectors(
        'count_values by (name) ("value", tcpwatch_sysctl{name=~"a|b",netns!="x"}) '
        "+ on (instance) group_left (process) "
        "sum(rate(tcpwatch_listen_drops_total{netns='host'}[$__rate_interval])) or vector(0)"
    )
    assert found == [
        Selector(
            "tcpwatch_sysctl", (("name", "=~", "a|b"), ("netns", "!=", "x")), None, "count_values"
        ),
        Selector(
            "tcpwatch_listen_drops_total", (("netns", "=", "host"),), "[$__rate_interval]", "rate"
        ),
    ]


def test_dashboard_identity_and_layout() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "tcpwatch"
    assert dashboard["title"]
    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"panels {other!r} and {panel['title']!r} overlap"
        if panel["type"] != "row":
            assert panel.get("description"), f"panel {panel['title']!r} has no description"


@cache
def metric_sections() -> dict[str, str]:
    """tcpwatch metric name -> the ``## `` section of docs/metrics.md that documents it."""
    sections: dict[str, str] = {}
    section = ""
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        match = re.match(r"\|\s*`(tcpwatch_\w+)`", line)
        if match is not None:
            sections[match.group(1)] = section
    return sections


def rows_of_panels(panels: list[dict[str, Any]]) -> dict[int, str]:
    """Panel id -> the title of the row Grafana shows it under: the row above it in the grid
    (panels of an expanded row follow it at the top level), or the collapsed row holding it."""
    rows: dict[int, str] = {}
    ordered = sorted(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    current = ""
    for panel in ordered:
        if panel["type"] == "row":
            current = panel["title"]
            for inner in panel.get("panels", []):
                rows[inner["id"]] = current
        else:
            rows[panel["id"]] = current
    return rows


def test_every_panel_sits_in_the_row_its_metrics_belong_to() -> None:
    # Issue 22 item 5: "Live connections per destination" sat under "Tunables".
    panels = load_dashboard()["panels"]
    rows = rows_of_panels(panels)
    sections = metric_sections()
    row_titles = {p["title"] for p in panels if p["type"] == "row"}
    assert set(ROW_OF_SECTION.values()) | {SUMMARY_ROW} == row_titles
    problems = []
    for panel in iter_panels(panels):
        if panel["type"] == "row":
            continue
        row = rows[panel["id"]]
        if not row:
            problems.append(f"{panel['title']!r} sits above the first row")
            continue
        metrics = {
            selector.metric
            for target in panel["targets"]
            for selector in selectors(target["expr"])
            if selector.metric.startswith("tcpwatch_")
        }
        homes = {
            sections.get(metric.removesuffix("_bucket"), sections.get(metric)) for metric in metrics
        }
        if len(homes) != 1 or row == SUMMARY_ROW:
            continue  # a panel that sets one part against another (TIME_WAIT vs its sysctl)
        (home,) = homes
        wanted = ROW_OF_SECTION.get(home or "")
        if wanted is not None and wanted != row:
            problems.append(f"{panel['title']!r} shows {home} metrics but sits in row {row!r}")
    assert problems == []
    by_title = {p["title"]: p for p in iter_panels(panels)}
    live = by_title["Live connections per destination (highest RTT first)"]
    assert rows[live["id"]] == "Connection quality"


def test_each_row_is_tiled_without_gaps() -> None:
    """Every row's panels fill its full width from the row down to the next row: no hole for a
    panel to drift into, no panel overlapping the next row (issue 16 item 5)."""
    panels = load_dashboard()["panels"]
    rows = sorted((p for p in panels if p["type"] == "row"), key=lambda p: p["gridPos"]["y"])
    assert rows and rows[0]["gridPos"]["y"] == 0, "the dashboard starts with a row"
    members: dict[str, list[dict[str, Any]]] = {row["title"]: [] for row in rows}
    owner = rows_of_panels(panels)
    for panel in iter_panels(panels):
        if panel["type"] != "row":
            members[owner[panel["id"]]].append(panel)
    top = 0
    for row in rows:
        grid = row["gridPos"]
        assert (grid["x"], grid["w"], grid["h"]) == (0, 24, 1), row["title"]
        assert grid["y"] == top, f"row {row['title']!r} at y={grid['y']}, expected {top}"
        start = grid["y"] + 1
        cells: set[tuple[int, int]] = set()
        for panel in members[row["title"]]:
            pos = panel["gridPos"]
            cells.update(
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            )
        assert members[row["title"]], f"row {row['title']!r} is empty"
        bottom = max(y for _, y in cells) + 1
        holes = sorted(
            (x, y) for x in range(24) for y in range(start, bottom) if (x, y) not in cells
        )
        assert holes == [], f"row {row['title']!r} has holes at (x, y) {holes[:8]}"
        assert min(y for _, y in cells) == start, row["title"]
        top = start if row.get("collapsed") else bottom


def test_template_variables_instance_netns_and_datasource() -> None:
    dashboard = load_dashboard()
    variables = template_variables(dashboard)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "netns"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["multi"] and variable["includeAll"], name
        assert variable["allValue"] == ".+", name
        assert variable["datasource"]["uid"] == "${datasource}", name
        query = variable["query"]["query"]
        assert re.fullmatch(rf"label_values\((.+), {name}\)", query), query
    # netns choices follow the chosen instances.
    assert '$instance"' in variables["netns"]["query"]["query"]
    for panel in iter_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    """promtool parses every expression of a rule file: one recording rule per panel query."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not on PATH (Debian package prometheus)"
    queries = panel_queries(load_dashboard())
    variables = template_variables(load_dashboard())
    for name in ("instance", "netns"):
        query = variables[name]["query"]["query"]
        selector = re.fullmatch(r"label_values\((.+), \w+\)", query)
        assert selector is not None
        queries.append(PanelQuery(f"variable {name}", name, selector.group(1)))
    rules = [
        {"record": f"dashboard:query_{number}", "expr": substitute(query.expr, PARSE_VALUES)}
        for number, query in enumerate(queries)
    ]
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        # Name the panel: promtool reports the failing rule's index.
        index = re.search(r"group \"dashboard\", rule (\d+)", result.stdout + result.stderr)
        culprit = queries[int(index.group(1)) - 1] if index else None
        pytest.fail(f"promtool rejects a dashboard query ({culprit}):\n{result.stderr}")
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_queries_use_only_documented_metrics_labels_and_sysctls() -> None:
    problems = [
        f"{query}: {problem}"
        for query in panel_queries(load_dashboard())
        for problem in undocumented_use(query.expr)
    ]
    assert problems == []


# One count for the whole host (the kernel keeps them globally; docs/metrics.md, series
# arithmetic): only the host's namespace exports them, so a panel must not filter them by $netns.
HOST_WIDE_METRICS = frozenset({"tcpwatch_orphan_sockets", "tcpwatch_tcp_memory_bytes"})


def test_every_tcpwatch_selector_filters_by_instance_and_netns() -> None:
    problems = []
    documented = documented_metrics()
    for query in panel_queries(load_dashboard()):
        found = selectors(query.expr)
        # `X{netns=~"$netns"} or on (...) ... X{netns="host"}`: the host's value where a namespace
        # has none of its own (it leaves out tunables equal to the host's).
        chosen = {
            (s.metric, s.matcher("name")) for s in found if s.matcher("netns") == ("=~", "$netns")
        }
        for selector in found:
            if not selector.metric.startswith("tcpwatch_"):
                continue
            if selector.matcher("instance") != ("=~", "$instance"):
                problems.append(f"{query}: {selector.metric} is not filtered by $instance")
            netns = selector.matcher("netns")
            if selector.metric in HOST_WIDE_METRICS:
                if netns is not None:
                    problems.append(f"{query}: host-wide {selector.metric} filtered by netns")
            elif netns == ("=", "host") and (selector.metric, selector.matcher("name")) in chosen:
                continue  # the host's value as the fallback of the same selection
            elif selects_host_only_sysctls(selector):
                # The limit lives in the host's namespace whichever namespaces are chosen.
                if netns != ("=", "host"):
                    problems.append(f'{query}: host-only sysctl not read from netns="host"')
            elif "netns" in documented.get(selector.metric, frozenset()) and netns != (
                "=~",
                "$netns",
            ):
                problems.append(f"{query}: {selector.metric} is not filtered by $netns")
    assert problems == []


def test_rates_use_rate_interval_and_counters_are_never_plotted_raw() -> None:
    problems = []
    for query in panel_queries(load_dashboard()):
        for selector in selectors(query.expr):
            is_counter = selector.metric.endswith(("_total", "_bucket"))
            if selector.function in ("rate", "irate") and selector.range != "[$__rate_interval]":
                problems.append(f"{query}: {selector.function}() over {selector.range}")
            if selector.function in RATE_FUNCTIONS and not is_counter:
                problems.append(f"{query}: {selector.function}() of gauge {selector.metric}")
            if is_counter and selector.function not in RATE_FUNCTIONS:
                problems.append(f"{query}: counter {selector.metric} outside rate()/increase()")
            if selector.range is not None and selector.function not in RATE_FUNCTIONS:
                problems.append(f"{query}: range selector outside rate()/increase()")
    assert problems == []


def test_every_exported_metric_is_on_the_dashboard() -> None:
    used = {s.metric for q in panel_queries(load_dashboard()) for s in selectors(q.expr)}
    documented = documented_metrics()
    histogram_parts = {name for name in documented if name.endswith(("_sum", "_count"))}
    # A histogram is on the dashboard through its _bucket series.
    histograms = {name for name in documented if f"{name}_bucket" in documented}
    wanted = set(documented) - histogram_parts - histograms
    assert sorted(wanted - used) == []


def test_issue_panels_are_present() -> None:
    """The questions issue 4 lists, each answered by a panel of the right kind."""
    by_title = {panel["title"]: panel for panel in iter_panels(load_dashboard()["panels"])}

    def metrics_of(title: str) -> set[str]:
        return {s.metric for t in by_title[title]["targets"] for s in selectors(t["expr"])}

    assert by_title["Active findings"]["type"] == "table"
    assert metrics_of("Active findings") == {"tcpwatch_finding"}
    states = by_title["Socket states"]
    assert states["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    fill = by_title["Accept-queue fill per listener (worst first)"]
    assert fill["type"] == "table"
    assert fill["options"]["sortBy"] == [{"displayName": "fill", "desc": True}]
    assert "sort_desc(" in fill["targets"][0]["expr"]
    assert {"tcpwatch_listen_queue_length", "tcpwatch_listen_queue_max"} <= metrics_of(
        "Accept-queue fill per listener (worst first)"
    )
    assert metrics_of("SYN_RECV per listener (10 largest)") == {"tcpwatch_listen_syn_recv"}
    assert "tcpwatch_syn_queue_cookies_total" in metrics_of("SYN queue: syncookies and drops /s")
    drops = "Listen drops /s per listener, and the namespace's overflows"
    assert {"tcpwatch_listen_overflows_total", "tcpwatch_listener_drops_total"} <= metrics_of(drops)
    # Drops per listener beside the queue fill: a listener can drop while its fill looks low.
    assert "tcpwatch_listener_drops_total" in metrics_of(
        "Accept-queue fill per listener (worst first)"
    )
    time_wait = by_title["TIME_WAIT vs tcp_max_tw_buckets"]["targets"]
    assert 'state="time_wait"' in time_wait[0]["expr"]
    assert "net.ipv4.tcp_max_tw_buckets" in time_wait[1]["expr"]
    assert "tcpwatch_ephemeral_ports_used" in metrics_of(
        "Ephemeral port use per destination (worst first)"
    )
    close_wait = by_title["CLOSE_WAIT per process"]["targets"][0]["expr"]
    assert "tcpwatch_process_sockets" in close_wait and 'state="close_wait"' in close_wait
    sysctls = by_title["Key sysctls per host"]
    assert sysctls["transformations"][0]["id"] == "groupingToMatrix"
    assert "net.core.somaxconn" in sysctls["targets"][0]["expr"]


def test_findings_table_colours_severity_and_links_each_rule_page() -> None:
    panel = next(
        p for p in iter_panels(load_dashboard()["panels"]) if p["title"] == "Active findings"
    )
    overrides = {
        o["matcher"]["options"]: o["properties"] for o in panel["fieldConfig"]["overrides"]
    }
    severity = {p["id"]: p["value"] for p in overrides["Severity"]}
    mapping = severity["mappings"][0]["options"]
    # The query turns severity into 3/2/1 so the table sorts worst first.
    assert {value: (m["text"], m["color"]) for value, m in mapping.items()} == {
        "3": ("critical", "red"),
        "2": ("warning", "orange"),
        "1": ("info", "blue"),
    }
    assert severity["custom.cellOptions"]["type"] == "color-background"
    expr = panel["targets"][0]["expr"]
    for level, rank in (("critical", "3"), ("warning", "2")):
        assert re.search(rf'severity="{level}".*?== 1\) \* {rank}', expr), expr
    # The page the finding's own tcpwatch serves (issue 22 item 1): no placeholder host.
    links = {p["id"]: p["value"] for p in overrides["id"]}["links"]
    assert [link["url"] for link in links] == [
        "http://${__data.fields.instance}/rules/${__data.fields.id}"
    ]


def test_grafana_provisioning_files() -> None:
    datasources = yaml.safe_load(
        (PROVISIONING / "datasources" / "tcpwatch-prometheus.yml").read_text(encoding="utf-8")
    )
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert re.fullmatch(r"\d+s", source["jsonData"]["timeInterval"])
    providers = yaml.safe_load(
        (PROVISIONING / "dashboards" / "tcpwatch.yml").read_text(encoding="utf-8")
    )
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    # The install steps copy the dashboard to where the provider looks for it.
    install = DASHBOARDS_DOC.read_text(encoding="utf-8")
    assert f"deploy/grafana/tcpwatch.json {path}/" in install, path
