"""``tcpwatch metrics`` run inside a namespace, against ``ss``/``nstat`` there and ``promtool``.

Every standard population is built in one namespace; ``ip netns exec NAME python -m tcpwatch
metrics`` runs in a window where ss and nstat read the same before and after it, and each test
compares a part of the exposition (parsed with prometheus_client's own parser) with them.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tcpwatch.model import FAMILIES, STATES

from . import populations
from .netns import KERNEL_COUNTER_METRICS, Netns, Observation, observe, run_tcpwatch

pytestmark = pytest.mark.integration

# Series without a netns label, as docs/metrics.md lists them ("all but tcpwatch_build_info and
# the process_* metrics"); every other tcpwatch_* series must name the namespace.
# Process-wide series: about tcpwatch's poll as a whole, not one namespace (docs/metrics.md).
WITHOUT_NETNS = frozenset(
    {
        "tcpwatch_build_info",
        "tcpwatch_netns_polled",
        "tcpwatch_last_poll_timestamp_seconds",
        "tcpwatch_poll_duration_seconds",
        "tcpwatch_page_size_bytes",  # the kernel's, the same in every namespace
    }
)


@dataclass(frozen=True)
class Exposition:
    netns: str
    built: list[populations.Population]
    window: Observation[subprocess.CompletedProcess[str]]
    listed_names: tuple[str, ...]  # `ip netns list`, while the namespace existed

    @property
    def text(self) -> str:
        return self.window.result.stdout

    def samples(self, name: str) -> list[Sample]:
        """Samples called ``name`` (``tcpwatch_listen_overflows_total``, not the family name)."""
        assert self.window.result.returncode == 0, self.window.result.stderr
        return [
            sample
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            if sample.name == name
        ]


@pytest.fixture(scope="module")
def exposition(integration_prerequisites: None) -> Iterator[Exposition]:
    with Netns() as ns:
        built = populations.standard_set(ns)
        window = observe(
            ns, lambda: run_tcpwatch(ns, "metrics"), watched_counters=KERNEL_COUNTER_METRICS
        )
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        names = tuple(line.split()[0] for line in listed.splitlines())
        yield Exposition(ns.name, built, window, names)


def test_metrics_exits_zero_and_prints_an_exposition(exposition: Exposition) -> None:
    result = exposition.window.result
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert exposition.samples("tcpwatch_build_info"), result.stdout[:2000]


def test_sockets_match_ss(exposition: Exposition) -> None:
    expected = {(family, state): 0 for family in FAMILIES for state in STATES}
    for family in FAMILIES:
        for sock in exposition.window.sockets[family]:
            expected[(family, sock.state)] += 1
    got = {
        (sample.labels["family"], sample.labels["state"]): sample.value
        for sample in exposition.samples("tcpwatch_sockets")
    }
    assert got == expected
    built = sum(
        count
        for population in exposition.built
        for states in population.info["sockets"].values()
        for count in states.values()
    )
    assert sum(expected.values()) == built, "ss does not show the population that was built"


def _ss_listeners(exposition: Exposition) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(address, port, socket) -> (Recv-Q, Send-Q) from `ss -ltnHe`.

    ``socket`` numbers the listeners of one address:port by ascending inode, as tcpwatch does.
    """
    rows = sorted(
        (sock.local_address, sock.local_port, sock.inode or 0, sock.recv_q, sock.send_q)
        for family in FAMILIES
        for sock in exposition.window.listeners[family]
    )
    listeners = {}
    seen: Counter[tuple[str, int]] = Counter()
    for address, port, _, recv_q, send_q in rows:
        index = seen[(address, port)]
        seen[(address, port)] += 1
        listeners[(address, str(port), str(index))] = (recv_q, send_q)
    return listeners


def _listener_series(exposition: Exposition, name: str) -> dict[tuple[str, str, str], float]:
    return {
        (sample.labels["address"], sample.labels["port"], sample.labels["socket"]): sample.value
        for sample in exposition.samples(name)
    }


def test_listen_queue_length_and_max_match_ss_lnt(exposition: Exposition) -> None:
    listeners = _ss_listeners(exposition)
    assert _listener_series(exposition, "tcpwatch_listen_queue_length") == {
        key: recv_q for key, (recv_q, _) in listeners.items()
    }
    assert _listener_series(exposition, "tcpwatch_listen_queue_max") == {
        key: send_q for key, (_, send_q) in listeners.items()
    }
    assert any(key[2] == "1" for key in listeners), "the SO_REUSEPORT pair is missing"
    assert any(recv_q > send_q for recv_q, send_q in listeners.values()), "no full accept queue"


def test_listen_syn_recv_matches_ss(exposition: Exposition) -> None:
    """SYN-RECV lines per port; socket 0 of a SO_REUSEPORT group carries the group's."""
    per_port = Counter(
        sock.local_port
        for family in FAMILIES
        for sock in exposition.window.sockets[family]
        if sock.state == "syn_recv"
    )
    expected = {
        key: float(per_port[int(key[1])]) if key[2] == "0" else 0.0
        for key in _ss_listeners(exposition)
    }
    assert _listener_series(exposition, "tcpwatch_listen_syn_recv") == expected
    assert sum(expected.values()) > 0, "the SYN_RECV population is missing"


def test_kernel_counters_match_nstat(exposition: Exposition) -> None:
    counters = exposition.window.counters_before
    got = {}
    for nstat_name, metric in KERNEL_COUNTER_METRICS.items():
        samples = exposition.samples(f"{metric}_total")
        got[nstat_name] = [sample.value for sample in samples]
    assert got == {name: [float(counters[name])] for name in KERNEL_COUNTER_METRICS}
    assert counters["TcpExtListenOverflows"] >= 3, "the accept-queue overflow is missing"


def test_promtool_check_metrics_passes(exposition: Exposition) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH (Debian package `prometheus`)", pytrace=False)
    assert exposition.window.result.returncode == 0, exposition.window.result.stderr
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition.text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_series_names_the_namespace(exposition: Exposition) -> None:
    assert exposition.netns in exposition.listed_names
    assert exposition.window.result.returncode == 0, exposition.window.result.stderr
    wrong = sorted(
        {
            (family.name, sample.labels.get("netns"))
            for family in text_string_to_metric_families(exposition.text)
            if family.name.startswith("tcpwatch_") and family.name not in WITHOUT_NETNS
            for sample in family.samples
            if sample.labels.get("netns") != exposition.netns
        },
        key=str,
    )
    assert wrong == [], f"series without netns={exposition.netns!r}: {wrong}"
