"""The described owners' families: one series per (namespace, process name), never per pid."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client.core import Metric

from tcpwatch.model import OwnerProcess, ProcessRef
from tcpwatch.render.families.owners import owner_families
from tcpwatch.render.families.sockdiag import listener_families
from tcpwatch.state import ExportState
from tests.unit.snapshots import T0, listener, owner_process, snapshot, socket_table

Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


def series(metrics: list[Metric]) -> Series:
    values: Series = {}
    for metric in metrics:
        for sample in metric.samples:
            values.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return values


def exposed(*described: OwnerProcess) -> Series:
    """Three nginx listeners (one per worker) and a CLOSE_WAIT holder, as ``described``."""
    listeners = [listener(80, inode=7000 + index, socket_index=index) for index in range(3)]
    pids = [process.pid for process in described]
    owners = {7000 + index: ProcessRef(pid, "nginx") for index, pid in enumerate(pids[:3])}
    owners |= {9000 + n: ProcessRef(pids[3], "app") for n in range(4)}
    table = socket_table(listeners, close_wait_inodes=range(9000, 9004))
    state = ExportState(
        snapshots=(snapshot(sockets=table, owners=owners, described=described),),
        findings=(),
        last_poll=T0,
    )
    return series([*owner_families.render(state), *listener_families.render(state)])


def workers(*pids: int) -> list[OwnerProcess]:
    """nginx's master (owning the first listener, oldest, root) and two workers, then app."""
    master, first, second, app = pids
    return [
        replace(owner_process(master, "nginx", 40, 1024), user="root", started_at=T0 - 7200),
        owner_process(first, "nginx", 700, 1024),  # 68 %
        owner_process(second, "nginx", 900, 4096),  # 22 %: more descriptors, further from it
        owner_process(app, "app", 95, None, None, listeners=0, close_wait=4),
    ]


def test_processes_of_one_name_share_a_series_with_the_worst_ratio_and_the_oldest_start() -> None:
    got = exposed(*workers(20, 21, 22, 30))
    nginx = (("netns", "host"), ("process", "nginx"))
    app = (("netns", "host"), ("process", "app"))
    assert got["tcpwatch_process_open_fds"] == {nginx: 700, app: 95}
    assert got["tcpwatch_process_max_fds"] == {nginx: 1024}  # app: unlimited, absent
    assert got["tcpwatch_process_max_fds_hard"] == {nginx: 524288}
    assert got["tcpwatch_process_start_time_seconds"] == {
        (*nginx, ("user", "root")): T0 - 7200,
        (*app, ("user", "www-data")): T0 - 3600,
    }


def test_a_restart_with_new_pids_changes_values_at_most_and_the_listener_info_pid() -> None:
    before = exposed(*workers(20, 21, 22, 30))
    after = exposed(*workers(120, 121, 122, 130))
    info = "tcpwatch_listener_info"
    for name in set(before) | set(after):
        if name != info:
            assert before[name].keys() == after[name].keys(), name

    def without_pid(found: Series) -> set[tuple[tuple[str, str], ...]]:
        return {tuple(kv for kv in labels if kv[0] != "pid") for labels in found[info]}

    assert without_pid(before) == without_pid(after)
    assert {dict(labels)["pid"] for labels in before[info]} == {"20", "21", "22"}
    assert {dict(labels)["pid"] for labels in after[info]} == {"120", "121", "122"}
