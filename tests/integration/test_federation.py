"""The fleet view end to end: nodes, two site Prometheus servers, a global one federating them.

Six throw-away namespaces are the nodes, each running ``tcpwatch serve`` and real traffic: the
churn (completed, refused, timed-out and lossy connections to local services on 127.4.0.1, the
same destination labels on every node), one node with a full accept queue that keeps dropping
SYNs (Q01, critical; drops at the listener), one
with ``net.core.somaxconn`` at 1024 (K05, warning). Two "site" namespaces run Debian's
prometheus, each scraping three nodes over veth pairs, evaluating the shipped recording rules
(group intervals cut to 1 s) and labelled ``site`` a or b; a "global" namespace runs a third
Prometheus federating them with the job of ``deploy/prometheus/global-federation.example.yml``
(targets and intervals adjusted). Every address is in 127.0.0.0/8 (``route_localnet``), inside
namespaces this test made; every process is killed and every namespace removed afterwards.

Then: the global Prometheus holds the federated fleet series of both sites and nothing raw;
every query of every fleet dashboard panel answers with data; the ranking puts the node with a
critical finding first, its full listener leads the listeners that drop, the refused destination
fails from every node; a node whose tcpwatch
stops shows as not reporting. And what the recording rules save: the global's series against
the raw series the sites hold.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import populations
from tests.integration.churn import start_churn
from tests.integration.netns import Netns
from tests.integration.test_prometheus_e2e import FETCH, shortened_rules
from tests.unit.test_fleet_dashboard import GLOBAL_EXAMPLE, fleet_queries

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TCPWATCH = (sys.executable, "-m", "tcpwatch")
LIFETIME = 420.0  # hard cap on every process this test starts, in seconds
NODES_PER_SITE = 3
SITES = ("a", "b")
SERVICE = "127.4.0.1"  # each node's local services: one destination label fleet-wide
CHURN_PORT = 25000  # ok, refused (+1), timed out (+2), lossy (+3)
QUEUE_PORT = 25010
CRITICAL_NODE = 1  # a full accept queue
WARNING_NODE = 4  # somaxconn 1024
STOPPED_NODE = 5  # its tcpwatch is stopped at the end
TIMEOUT = 150.0

# Knocks on the full accept queue every half second (each SYN is dropped at the listener) and
# gives up after a second: the listener's drops keep rising while the test runs.
KNOCK = r"""
import socket, sys, time
port, stop = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
pending = []
print("ready", flush=True)
while time.monotonic() < stop:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    pending.append((time.monotonic() + 1.0, sock))
    while pending and pending[0][0] <= time.monotonic():
        pending.pop(0)[1].close()
    time.sleep(0.5)
"""


@dataclass(frozen=True, slots=True)
class Prometheus:
    """A Prometheus server in ``ns``, on 127.0.0.1:9090 there."""

    ns: Netns
    process: Any

    def fetch(self, paths: list[str]) -> list[dict[str, Any]]:
        urls = [f"http://127.0.0.1:9090{path}" for path in paths]
        result = self.ns.run(sys.executable, "-c", FETCH, json.dumps(urls), timeout=120)
        answers: list[dict[str, Any]] = json.loads(result.stdout)
        return answers

    def query_all(self, exprs: list[str]) -> list[list[dict[str, Any]]]:
        paths = [f"/api/v1/query?{urllib.parse.urlencode({'query': e})}" for e in exprs]
        results = []
        for expr, answer in zip(exprs, self.fetch(paths), strict=True):
            assert answer["status"] == 200, f"{expr}: {answer}"
            payload = json.loads(answer["body"])
            assert payload["status"] == "success", f"{expr}: {payload}"
            results.append(payload["data"]["result"])
        return results

    def query(self, expr: str) -> list[dict[str, Any]]:
        [result] = self.query_all([expr])
        return result

    def ready(self) -> bool:
        [answer] = self.fetch(["/-/ready"])
        return answer["status"] == 200

    def log(self) -> str:
        return str(self.ns.stderr_of(self.process)[-3000:])


def wait_for(what: str, check: Callable[[], bool], logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {TIMEOUT:.0f} s\n{logs()}")
        time.sleep(1.0)


def veth(a: Netns, b: Netns, a_if: str, b_if: str, a_address: str, b_address: str) -> None:
    a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    for ns, interface, address in ((a, a_if, a_address), (b, b_if, b_address)):
        ns.sysctl("net.ipv4.conf.all.route_localnet", 1)
        ns.sysctl(f"net.ipv4.conf.{interface}.route_localnet", 1)
        ns.run("ip", "addr", "add", f"{address}/24", "dev", interface)
        ns.run("ip", "link", "set", interface, "up")


def start_prometheus(
    ns: Netns, work: Path, config: dict[str, Any], rules: dict[str, Any] | None = None
) -> Prometheus:
    work.mkdir()
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    if rules is not None:
        (work / "recording.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    process = ns.spawn(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            "--web.listen-address=0.0.0.0:9090",
            "--log.level=warn",
        ],
        lifetime=LIFETIME,
        cwd=str(work),
    )
    return Prometheus(ns, process)


def site_config(site: str, targets: list[str]) -> dict[str, Any]:
    return {
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
            "external_labels": {"site": site},
        },
        "rule_files": ["recording.yml"],
        "scrape_configs": [{"job_name": "tcpwatch", "static_configs": [{"targets": targets}]}],
    }


def global_config(targets: list[str]) -> dict[str, Any]:
    """The shipped example's federation job, pointed at this test's sites, every second."""
    with GLOBAL_EXAMPLE.open(encoding="utf-8") as handle:
        config: dict[str, Any] = yaml.safe_load(handle)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    [job] = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": targets}])
    return config


@dataclass
class Fleet:
    nodes: list[Netns]
    tcpwatch: list[Any]
    sites: list[Prometheus]
    global_: Prometheus

    def instance(self, index: int) -> str:
        return f"127.6.{index}.1:9477"

    def logs(self) -> str:
        parts = [f"--- site {site.ns.name}:\n{site.log()}" for site in self.sites]
        parts.append(f"--- global:\n{self.global_.log()}")
        for node, process in zip(self.nodes, self.tcpwatch, strict=True):
            parts.append(f"--- tcpwatch {node.name}:\n{node.stderr_of(process)[-1500:]}")
        return "\n".join(parts)


@contextmanager
def running_fleet(tmp_path: Path) -> Iterator[Fleet]:
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH: install Debian's prometheus package")
    _, recording = shortened_rules()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=tmp_path)))
        world = stack.enter_context(Netns("twg"))
        sites = [stack.enter_context(Netns(f"tws{site}")) for site in SITES]
        nodes = [stack.enter_context(Netns("twn")) for _ in range(NODES_PER_SITE * len(SITES))]
        for index, node in enumerate(nodes):
            site = sites[index // NODES_PER_SITE]
            veth(node, site, "twu", f"twd{index}", f"127.6.{index}.1", f"127.6.{index}.2")
        for number, site in enumerate(sites):
            veth(site, world, "twu", f"twd{number}", f"127.7.{number}.1", f"127.7.{number}.2")
        # The nodes: tcpwatch and traffic.
        processes = []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for index, node in enumerate(nodes):
            if index == WARNING_NODE:
                node.sysctl("net.core.somaxconn", 1024)
            address = f"127.6.{index}.1:9477"
            processes.append(
                node.spawn(
                    [*TCPWATCH, "serve", "--listen", address, "--interval", "1"],
                    lifetime=LIFETIME,
                    env=env,
                    cwd=str(REPO),
                )
            )
            start_churn(node, CHURN_PORT, LIFETIME - 20, lossy=True, host=SERVICE)
        populations.accept_queue_full(nodes[CRITICAL_NODE], QUEUE_PORT)
        knock = nodes[CRITICAL_NODE].spawn(
            [sys.executable, "-c", KNOCK, str(QUEUE_PORT), str(LIFETIME - 20)], lifetime=LIFETIME
        )
        assert nodes[CRITICAL_NODE].read_line(knock, timeout=30) == "ready"
        # The sites and the global Prometheus.
        servers = []
        for number, (name, site) in enumerate(zip(SITES, sites, strict=True)):
            own = range(number * NODES_PER_SITE, (number + 1) * NODES_PER_SITE)
            config = site_config(name, [f"127.6.{i}.1:9477" for i in own])
            servers.append(start_prometheus(site, work / f"site-{name}", config, recording))
        targets = [f"127.7.{number}.1:9090" for number in range(len(SITES))]
        top = start_prometheus(world, work / "global", global_config(targets))
        fleet = Fleet(nodes, processes, servers, top)
        try:
            yield fleet
        finally:
            for server in (top, *servers):
                server.ns.stop(server.process)


def test_a_global_prometheus_federating_two_sites_fills_the_fleet_dashboard(
    integration_prerequisites: None, tmp_path: Path
) -> None:
    with running_fleet(tmp_path) as fleet:
        everyone = [fleet.instance(i) for i in range(len(fleet.nodes))]
        wait_for(
            "every Prometheus ready",
            lambda: all(p.ready() for p in (*fleet.sites, fleet.global_)),
            fleet.logs,
        )
        queries = fleet_queries()
        exprs = [expr for _, expr in queries]

        def all_answer() -> bool:
            up = fleet.global_.query("instance:tcpwatch_up:max == 1")
            if {sample["metric"]["instance"] for sample in up} != set(everyone):
                return False
            answers = fleet.global_.query_all(exprs)
            return all(answers[i] for i, (panel, _) in enumerate(queries)
                       if panel != "Which nodes are not reporting")  # fmt: skip

        wait_for("every fleet panel answering from the global Prometheus", all_answer, fleet.logs)

        up = fleet.global_.query("instance:tcpwatch_up:max")
        sites = {s["metric"]["instance"]: s["metric"].get("site") for s in up}
        assert sites == {fleet.instance(i): SITES[i // NODES_PER_SITE] for i in range(6)}
        raw = fleet.global_.query('count({__name__=~"tcpwatch_.+"})')
        assert raw == [], "raw tcpwatch series reached the global Prometheus"

        # Every node has the churn's findings (C01, C02); the one with a full queue has one
        # critical finding more and ranks first, as the dashboard's table ranks.
        ranking = 'topk(1, instance:tcpwatch_trouble:score{site=~".*"})'
        wait_for(
            "the node with a full accept queue ranked first",
            lambda: (
                [s["metric"]["instance"] for s in fleet.global_.query(ranking)]
                == [fleet.instance(CRITICAL_NODE)]
            ),
            fleet.logs,
        )
        q01 = fleet.global_.query('id_slug_severity:tcpwatch_finding_hosts:count{id="Q01"}')
        assert [float(s["value"][1]) for s in q01] == [1.0]
        refused = f"{SERVICE}:{CHURN_PORT + 1}"
        failing_expr = f'sum by (peer) (peer:tcpwatch_failing_instances:count{{peer="{refused}"}})'

        def failing_instances() -> float:
            answer = fleet.global_.query(failing_expr)
            return float(answer[0]["value"][1]) if answer else 0.0

        # Each node's refusals reach the global Prometheus through its site's recording rules a
        # few evaluations apart: a loaded CI run once read 5 right after the ranking settled.
        wait_for("all 6 nodes failing to reach the refused port", lambda: failing_instances() == 6,
                 fleet.logs)  # fmt: skip
        [ratio] = fleet.global_.query(
            f'sum by (peer) (peer:tcpwatch_connect_failures:rate5m{{peer="{refused}"}}) '
            f'/ sum by (peer) (peer:tcpwatch_connect_attempts:rate5m{{peer="{refused}"}})'
        )
        assert float(ratio["value"][1]) == 1.0
        [rtt] = fleet.global_.query(
            f"histogram_quantile(0.9, sum by (peer, le) "
            f'(peer_le:tcpwatch_connection_rtt_seconds_bucket:rate5m{{peer="{SERVICE}:{CHURN_PORT}"}}))'
        )
        assert 0 < float(rtt["value"][1]) < 0.01  # loopback: well under 10 ms
        [dropping] = [expr for panel, expr in queries if panel == "Listeners dropping connections"]
        listeners = {
            (s["metric"]["instance"], s["metric"]["address"], s["metric"]["port"])
            for s in fleet.global_.query(dropping)
        }
        assert (fleet.instance(CRITICAL_NODE), "127.0.0.1", str(QUEUE_PORT)) in listeners
        one_site = fleet.global_.query('instance:tcpwatch_trouble:score{site=~"b"}')
        assert {s["metric"]["instance"] for s in one_site} == set(everyone[3:])

        # What the recording rules save: the global's series against the sites' raw ones.
        held = [float(site.query('count({job="tcpwatch"})')[0]["value"][1]) for site in fleet.sites]
        federated = float(fleet.global_.query('count({job="federate-tcpwatch"})')[0]["value"][1])
        print(json.dumps({"site_raw_series": held, "global_series": federated}))
        assert federated * 5 < sum(held)

        # A node whose tcpwatch stops is named, not silently missing.
        fleet.nodes[STOPPED_NODE].stop(fleet.tcpwatch[STOPPED_NODE])
        [not_reporting] = [
            expr for panel, expr in queries if panel == "Which nodes are not reporting"
        ]
        wait_for(
            "the stopped node not reporting",
            lambda: (
                [s["metric"]["instance"] for s in fleet.global_.query(not_reporting)]
                == [fleet.instance(STOPPED_NODE)]
            ),
            fleet.logs,
        )
