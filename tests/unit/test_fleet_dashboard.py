"""Static checks of the fleet dashboard (deploy/grafana/tcpwatch-fleet.json).

It reads a global Prometheus that federates the recording rules from each site's: so every query
must parse (promtool), read only series tcpwatch-recording.yml records and the example global
configuration federates, filter by the ``site`` variable, and link a node to the node dashboard
with variables that dashboard has. tests/integration/test_federation.py runs the same queries
against real Prometheus servers and requires data from each.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_dashboard import (
    iter_panels,
    load_dashboard,
    panel_queries,
    selectors,
    substitute,
    template_variables,
)

REPO = Path(__file__).resolve().parents[2]
FLEET_DASHBOARD = REPO / "deploy" / "grafana" / "tcpwatch-fleet.json"
RECORDING = REPO / "deploy" / "prometheus" / "tcpwatch-recording.yml"
GLOBAL_EXAMPLE = REPO / "deploy" / "prometheus" / "global-federation.example.yml"
SITE_EXAMPLE = REPO / "deploy" / "prometheus" / "scrape-config.example.yml"
FLEET_VALUES = {"site": ".*"}


@cache
def load_fleet_dashboard() -> dict[str, Any]:
    with FLEET_DASHBOARD.open(encoding="utf-8") as handle:
        dashboard: dict[str, Any] = json.load(handle)
    return dashboard


def recorded() -> set[str]:
    with RECORDING.open(encoding="utf-8") as handle:
        groups = yaml.safe_load(handle)["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def federated() -> re.Pattern[str]:
    """The ``__name__`` regex of the example global Prometheus' federation match."""
    with GLOBAL_EXAMPLE.open(encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    [job] = config["scrape_configs"]
    [match] = job["params"]["match[]"]
    found = re.fullmatch(r'\{__name__=~"(.+)"\}', match)
    assert found is not None, match
    return re.compile(found.group(1))


def fleet_queries() -> list[tuple[str, str]]:
    """(panel, expr with the variables substituted) for every panel query."""
    return [
        (query.panel, substitute(query.expr, FLEET_VALUES))
        for query in panel_queries(load_fleet_dashboard())
    ]


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not on PATH (Debian package prometheus)"
    queries = fleet_queries()
    rules = [{"record": f"fleet:query_{n}", "expr": expr} for n, (_, expr) in enumerate(queries)]
    rule_file = tmp_path / "fleet-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "fleet", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_queries_read_only_federated_recording_rules_of_the_selected_sites() -> None:
    records = recorded()
    pattern = federated()
    problems = []
    for query in panel_queries(load_fleet_dashboard()):
        for selector in selectors(query.expr):
            if selector.metric not in records:
                problems.append(f"{query}: {selector.metric} is not a recording rule")
            elif not pattern.fullmatch(selector.metric):
                problems.append(f"{query}: {selector.metric} is not federated")
            if selector.matcher("site") != ("=~", "$site"):
                problems.append(f'{query}: {selector.metric} without site=~"$site"')
    assert problems == []


def test_every_node_links_to_the_node_dashboard() -> None:
    node = load_dashboard()
    variables = template_variables(node)
    links = [
        link
        for panel in iter_panels(load_fleet_dashboard()["panels"])
        for override in panel.get("fieldConfig", {}).get("overrides", [])
        for prop in override["properties"]
        if prop["id"] == "links"
        for link in prop["value"]
    ]
    assert len(links) == 3  # the ranking, the nodes not reporting, the dropping listeners
    for link in links:
        url = link["url"]
        assert url.startswith(f"/d/{node['uid']}/"), url
        names = set(re.findall(r"var-(\w+)=", url))
        assert {"datasource", "instance"} <= names <= set(variables)
        for name in names - {"datasource"}:
            assert f"var-{name}=${{__data.fields.{name}}}" in url
        assert "var-datasource=${__data.fields.site}" in url


def test_sites_are_told_apart_by_the_label_the_examples_set() -> None:
    with SITE_EXAMPLE.open(encoding="utf-8") as handle:
        site = yaml.safe_load(handle)["global"]["external_labels"]
    assert "site" in site
    variable = template_variables(load_fleet_dashboard())["site"]
    assert variable["query"]["query"] == "label_values(instance:tcpwatch_up:max, site)"
    assert variable["includeAll"] and variable["allValue"] == ".*"


def test_the_fleet_dashboard_is_its_own_and_links_the_node_dashboard() -> None:
    fleet, node = load_fleet_dashboard(), load_dashboard()
    assert fleet["uid"] != node["uid"]
    assert [link["url"] for link in fleet["links"]] == [f"/d/{node['uid']}/tcpwatch-tcp-health"]


def test_the_global_example_is_a_valid_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not on PATH (Debian package prometheus)"
    result = subprocess.run(
        [promtool, "check", "config", GLOBAL_EXAMPLE.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=GLOBAL_EXAMPLE.parent,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    every = {name: bool(federated().fullmatch(name)) for name in recorded()}
    # The per-namespace views stay in each site's Prometheus; the fleet's are federated.
    assert (
        every["instance:tcpwatch_trouble:score"] and every["peer:tcpwatch_connect_attempts:rate5m"]
    )
    assert every["instance_netns_address_port:tcpwatch_listener_drops:rate5m"]
    assert not every["instance_netns:tcpwatch_listen_drops:rate5m"]
