"""Discovering every network namespace from a fake procfs: handles, cgroups, pod files, names.

A fake host is a tree under tmp_path::

    proc/self/ns/net                  our namespace
    proc/<pid>/ns/net                 hard link: the code compares st_ino only, and every hard
                                      link of a file has its inode, as every nsfs handle has the
                                      namespace's
    proc/<pid>/cgroup                 what the container runtime wrote
    proc/<pid>/root/etc/hostname      the container's own files (pod name, namespace, resolv.conf)
    run/netns/<name>                  ip netns bind mounts (hard links again)

Each runtime's cgroup line below is the shape that runtime writes (cgroup v1 and v2, systemd and
cgroupfs drivers); the ids are made up.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from tcpwatch.paths import ProcPaths
from tcpwatch.sources.netns import (
    NetnsGone,
    NetnsTarget,
    container_in_cgroup,
    discover,
    pod_namespace_from_resolv_conf,
    read_inside_root,
    run_inside,
    select,
)

SERVICE_ACCOUNT_DIR = "var/run/secrets/kubernetes.io/serviceaccount"


def container_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def pod_uid(seed: str) -> str:
    digits = hashlib.sha256(seed.encode()).hexdigest()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:32]}"


def pod_files(name: str, namespace: str) -> dict[str, str]:
    """What kubelet mounts into an app container: hostname and the service-account namespace."""
    return {"etc/hostname": f"{name}\n", f"{SERVICE_ACCOUNT_DIR}/namespace": namespace}


def kubepods_systemd(uid: str, runtime_prefix: str, cid: str, qos: str = "besteffort") -> str:
    """cgroup v2 line of a pod container with the systemd cgroup driver (uid spelled with _)."""
    slice_uid = uid.replace("-", "_")
    return (
        f"0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{slice_uid}.slice/"
        f"{runtime_prefix}-{cid}.scope\n"
    )


class FakeHost:
    """A fake procfs plus /run/netns under tmp_path; the host namespace holds pid 1 and us."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.proc = tmp_path / "proc"
        self.run_netns = tmp_path / "run" / "netns"
        self.store = tmp_path / "nsfs"  # one file per namespace, hard-linked from every handle
        for directory in (self.proc, self.run_netns, self.store):
            directory.mkdir(parents=True)
        self.paths = ProcPaths(root=str(self.proc))
        self.namespace("host")
        self.process(1, "host", cgroup="0::/init.scope\n")
        self.own("host")

    def namespace(self, label: str) -> int:
        path = self.store / label
        path.write_bytes(b"")
        return path.stat().st_ino

    def inode(self, label: str) -> int:
        return (self.store / label).stat().st_ino

    def process(
        self,
        pid: int,
        label: str,
        cgroup: str = "0::/user.slice/user-0.slice/session-1.scope\n",
        files: Mapping[str, str] | None = None,
    ) -> Path:
        """A process in namespace ``label``; ``files`` go below its root (relative paths)."""
        directory = self.proc / str(pid)
        (directory / "ns").mkdir(parents=True)
        os.link(self.store / label, directory / "ns" / "net")
        (directory / "cgroup").write_text(cgroup)
        root = directory / "root"
        root.mkdir()
        for relative, text in (files or {}).items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text)
        return root

    def own(self, label: str) -> None:
        handle = self.proc / "self" / "ns" / "net"
        handle.parent.mkdir(parents=True, exist_ok=True)
        handle.unlink(missing_ok=True)
        os.link(self.store / label, handle)

    def bind(self, name: str, label: str) -> None:
        os.link(self.store / label, self.run_netns / name)

    def discover(self) -> tuple[NetnsTarget, ...]:
        return discover(self.paths, run_netns_dir=str(self.run_netns))

    def by_name(self) -> dict[str, NetnsTarget]:
        targets = self.discover()
        named = {target.name: target for target in targets}
        assert len(named) == len(targets), f"duplicate names in {targets}"
        return named


# -- cgroup parsing, one runtime at a time ---------------------------------------------------

CID = container_id("app")
NODE = container_id("kind-node")
UID = pod_uid("web-7d4b9c")

RUNTIME_CGROUPS: Mapping[str, tuple[str, str, str]] = {
    # name: (cgroup file, container id expected, pod uid expected)
    "docker cgroupfs (v1)": (
        f"12:pids:/docker/{CID}\n11:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n0::/\n",
        CID[:12],
        "",
    ),
    "docker systemd (v2)": (f"0::/system.slice/docker-{CID}.scope\n", CID[:12], ""),
    "docker systemd (v1 hybrid)": (
        f"9:memory:/system.slice/docker-{CID}.scope\n"
        f"1:name=systemd:/system.slice/docker-{CID}.scope\n0::/system.slice/docker-{CID}.scope\n",
        CID[:12],
        "",
    ),
    "containerd CRI systemd": (kubepods_systemd(UID, "cri-containerd", CID), CID[:12], UID),
    "containerd CRI systemd guaranteed": (
        f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/"
        f"cri-containerd-{CID}.scope\n",
        CID[:12],
        UID,
    ),
    "containerd CRI cgroupfs (v1)": (
        f"11:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/"
        f"pod{UID}/{CID}\n",
        CID[:12],
        UID,
    ),
    "containerd CRI cgroupfs (v2)": (f"0::/kubepods/besteffort/pod{UID}/{CID}\n", CID[:12], UID),
    "CRI-O systemd": (kubepods_systemd(UID, "crio", CID, qos="burstable"), CID[:12], UID),
    "CRI-O cgroupfs": (f"0::/kubepods/besteffort/pod{UID}/crio-{CID}\n", CID[:12], UID),
    "podman rootful": (f"0::/machine.slice/libpod-{CID}.scope/container\n", CID[:12], ""),
    "podman rootless": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/"
        "container\n",
        CID[:12],
        "",
    ),
    "kind: a pod inside a node container": (
        f"0::/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/"
        f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod"
        f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n",
        CID[:12],
        UID,
    ),
    "seen from a private cgroup namespace": (
        f"0::/../../kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
        f"cri-containerd-{CID}.scope\n",
        CID[:12],
        UID,
    ),
}


@pytest.mark.parametrize("runtime", sorted(RUNTIME_CGROUPS))
def test_container_in_cgroup_per_runtime(runtime: str) -> None:
    text, expected_container, expected_uid = RUNTIME_CGROUPS[runtime]
    assert container_in_cgroup(text) == (expected_container, expected_uid)


@pytest.mark.parametrize(
    "text",
    [
        "0::/\n",
        "0::/init.scope\n",
        "0::/user.slice/user-0.slice/session-4.scope\n",
        "4:memory:/process_api/c0d8748992bfc271c30823102d166efc\n",  # 32 hex digits: not an id
        f"0::/system.slice/docker-{CID[:63]}.scope\n",  # one digit short
        f"0::/system.slice/x{CID}.scope\n",  # glued to a word: not a path component
        f"0::/system.slice/docker-{CID}0.scope\n",  # 65 digits
        "",
    ],
)
def test_cgroups_without_a_container(text: str) -> None:
    assert container_in_cgroup(text) is None


def test_a_pod_uid_needs_a_container_id_on_the_same_line() -> None:
    text = f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice\n"
    assert container_in_cgroup(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
            "nameserver 10.96.0.10\n",
            "shop",
        ),
        (
            "nameserver 10.96.0.10\n"
            "search kube-system.svc.k8s.example svc.k8s.example k8s.example\n"
            "options ndots:5\n",
            "kube-system",
        ),
        ("search example.com\nnameserver 1.1.1.1\n", ""),  # a Docker container copying the host
        ("search shop.svc.cluster.local cluster.local\n", ""),  # not kubelet's pair
        ("search Shop.svc.cluster.local svc.cluster.local\n", ""),  # not a DNS-1123 label
        ("", ""),
    ],
)
def test_pod_namespace_from_resolv_conf(text: str, expected: str) -> None:
    assert pod_namespace_from_resolv_conf(text) == expected


# -- identity and naming through discover() ---------------------------------------------------


@pytest.mark.parametrize("runtime", sorted(RUNTIME_CGROUPS))
def test_every_runtime_gives_a_named_namespace(tmp_path: Path, runtime: str) -> None:
    host = FakeHost(tmp_path)
    text, expected_container, expected_uid = RUNTIME_CGROUPS[runtime]
    inode = host.namespace("container")
    files = pod_files("web-7d4b9c-x2x4z", "shop") if expected_uid else {"etc/hostname": "abc\n"}
    host.process(4242, "container", cgroup=text, files=files)
    [target] = [t for t in host.discover() if t.inode == inode]
    assert target.container == expected_container
    assert target.pod_uid == expected_uid
    if expected_uid:
        assert (target.name, target.pod, target.pod_namespace) == (
            "pod:shop/web-7d4b9c-x2x4z",
            "web-7d4b9c-x2x4z",
            "shop",
        )
    else:
        assert (target.name, target.pod, target.pod_namespace) == (
            f"container:{expected_container}",
            "",
            "",
        )
    assert target.path == str(host.proc / "4242" / "ns" / "net")


def test_a_pod_sandbox_and_its_app_containers(tmp_path: Path) -> None:
    """The pause process (lowest pid) names the container; an app container names the pod."""
    host = FakeHost(tmp_path)
    host.namespace("pod")
    sandbox, app, sidecar = container_id("pause"), container_id("app"), container_id("sidecar")
    host.process(700, "pod", cgroup=kubepods_systemd(UID, "cri-containerd", sandbox))
    host.process(731, "pod", kubepods_systemd(UID, "cri-containerd", app), pod_files("web", "shop"))
    host.process(745, "pod", kubepods_systemd(UID, "cri-containerd", sidecar), {})
    target = host.by_name()["pod:shop/web"]
    assert (target.container, target.pod, target.pod_namespace, target.pod_uid) == (
        sandbox[:12],
        "web",
        "shop",
        UID,
    )


def test_the_service_account_file_as_kubelet_mounts_it(tmp_path: Path) -> None:
    """Through /var/run -> /run (an absolute link, as in Debian images) and kubelet's ..data."""
    host = FakeHost(tmp_path)
    host.namespace("pod")
    root = host.process(900, "pod", kubepods_systemd(UID, "crio", CID), {"etc/hostname": "api\n"})
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")
    account = root / "run" / "secrets" / "kubernetes.io" / "serviceaccount"
    (account / "..2024_05_01_10_00_00.1").mkdir(parents=True)
    (account / "..2024_05_01_10_00_00.1" / "namespace").write_text("payments")
    (account / "..data").symlink_to("..2024_05_01_10_00_00.1")
    (account / "namespace").symlink_to("..data/namespace")
    assert "pod:payments/api" in host.by_name()


def test_the_namespace_from_resolv_conf_when_no_token_is_mounted(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.namespace("pod")
    files = {
        "etc/hostname": "batch-28471\n",
        "etc/resolv.conf": "search jobs.svc.cluster.local svc.cluster.local cluster.local\n",
    }
    host.process(910, "pod", kubepods_systemd(UID, "cri-containerd", CID), files)
    assert host.by_name()["pod:jobs/batch-28471"].pod_uid == UID


def test_a_pod_whose_namespace_nothing_tells_is_named_by_its_container(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.namespace("pod")
    host.process(920, "pod", kubepods_systemd(UID, "cri-containerd", CID), {"etc/hostname": "x\n"})
    target = host.by_name()[f"container:{CID[:12]}"]
    assert (target.pod, target.pod_namespace, target.pod_uid) == ("x", "", UID)


def test_container_files_cannot_point_outside_the_container(tmp_path: Path) -> None:
    """A hostile image's /etc/hostname -> <a host file> must not turn that file into a label."""
    secret = tmp_path / "host-secret"
    secret.write_text("leaked\n")
    host = FakeHost(tmp_path)
    host.namespace("pod")
    root = host.process(930, "pod", kubepods_systemd(UID, "cri-containerd", CID))
    (root / "etc").mkdir()
    (root / "etc" / "hostname").symlink_to(secret)  # absolute: resolved inside the root
    account = root / SERVICE_ACCOUNT_DIR
    account.mkdir(parents=True)
    (account / "namespace").symlink_to("../../../../../../../../host-secret")  # climbing out
    target = host.by_name()[f"container:{CID[:12]}"]
    assert (target.pod, target.pod_namespace) == ("", "")
    assert read_inside_root(str(root), "etc/hostname") == ""


def test_a_fifo_in_a_container_does_not_block_discovery(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.namespace("pod")
    root = host.process(940, "pod", kubepods_systemd(UID, "cri-containerd", CID))
    (root / "etc").mkdir()
    fifo = root / "etc" / "hostname"
    os.mkfifo(fifo)
    found: list[tuple[NetnsTarget, ...]] = []
    worker = threading.Thread(target=lambda: found.append(host.discover()), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader before failing, so the thread can end
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        pytest.fail("discover() blocked opening a FIFO inside a container")
    assert [t.name for t in found[0] if t.inode == host.inode("pod")] == [f"container:{CID[:12]}"]


@pytest.mark.parametrize(
    "hostname",
    ["root:$6$salt$hash:19000:0:99999:7:::", "UPPER", "-leading-dash", "a" * 254, "two words"],
)
def test_a_hostname_that_is_no_pod_name_is_ignored(tmp_path: Path, hostname: str) -> None:
    host = FakeHost(tmp_path)
    host.namespace("pod")
    host.process(950, "pod", kubepods_systemd(UID, "crio", CID), pod_files(hostname, "shop"))
    target = host.by_name()[f"container:{CID[:12]}"]
    assert (target.pod, target.pod_namespace) == ("", "shop")


def test_an_ip_netns_name_beats_a_container(tmp_path: Path) -> None:
    """Someone ran a container in a namespace they made and named with `ip netns add`."""
    host = FakeHost(tmp_path)
    host.namespace("lab")
    host.bind("lab", "lab")
    host.process(960, "lab", f"0::/system.slice/docker-{CID}.scope\n")
    target = host.by_name()["lab"]
    assert target.container == CID[:12]
    assert target.path == str(host.run_netns / "lab")  # the bind mount outlives any process


@pytest.mark.parametrize(
    "pin", [f"cni-{pod_uid('a')}", pod_uid("b"), f"netns-{pod_uid('c')}"]
)  # containerd, CRI-O, Podman/netavark
def test_a_runtime_pin_gives_way_to_the_pod_name(tmp_path: Path, pin: str) -> None:
    host = FakeHost(tmp_path)
    host.namespace("pod")
    host.bind(pin, "pod")
    host.process(
        970, "pod", kubepods_systemd(UID, "cri-containerd", CID), pod_files("db-0", "data")
    )
    target = host.by_name()["pod:data/db-0"]
    assert target.path == str(host.run_netns / pin)


def test_a_runtime_pin_without_a_container_keeps_its_name(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    pin = f"cni-{pod_uid('sandbox-starting')}"
    host.namespace("pod")
    host.bind(pin, "pod")  # pinned, pause not started yet
    assert host.by_name()[pin].container == ""


def test_a_namespace_made_by_unshare_is_named_by_its_inode(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.namespace("unshared")
    for pid in (5120, 812, 1033):
        host.process(pid, "unshared")
    name = f"ns:{host.inode('unshared')}"
    target = host.by_name()[name]
    assert (target.container, target.pod) == ("", "")
    # Its lowest pid restarts as a higher one: same name, so the same series.
    (host.proc / "812" / "ns" / "net").unlink()
    host.process(9100, "unshared")
    assert host.by_name()[name].inode == target.inode


def test_the_host_is_named_host_and_carries_no_container(tmp_path: Path) -> None:
    """hostNetwork pods and runtime helpers (conmon) live in the host namespace."""
    host = FakeHost(tmp_path)
    proxy = container_id("kube-proxy")
    host.process(300, "host", kubepods_systemd(UID, "cri-containerd", proxy), pod_files("n1", "k"))
    host.process(301, "host", f"0::/machine.slice/libpod-conmon-{CID}.scope\n")
    targets = host.discover()
    assert targets[0] == NetnsTarget(name="host", inode=host.inode("host"), path=None)


def test_the_host_seen_from_another_namespace(tmp_path: Path) -> None:
    """tcpwatch in a pod (hostPID, no hostNetwork): pid 1's namespace is still `host`."""
    host = FakeHost(tmp_path)
    host.namespace("mine")
    host.process(4000, "mine", kubepods_systemd(UID, "cri-containerd", CID), pod_files("tw", "m"))
    host.own("mine")
    named = host.by_name()
    assert named["host"].path == str(host.proc / "1" / "ns" / "net")
    assert named["pod:m/tw"].path is None
    assert [t.name for t in host.discover()] == ["pod:m/tw", "host"]  # ours first


def test_discovery_order_and_unreadable_handles(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    for label in ("zeta", "alpha"):
        host.namespace(label)
        host.bind(label, label)
    (host.proc / "77").mkdir()  # not ours to read
    (host.proc / "78" / "ns").mkdir(parents=True)  # exited between listing and reading
    (host.run_netns / "stale").symlink_to(tmp_path / "nowhere")
    assert [t.name for t in host.discover()] == ["host", "alpha", "zeta"]


def test_two_ip_netns_names_of_one_namespace_give_one_target(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.namespace("shared")
    host.bind("zulu", "shared")
    host.bind("alpha", "shared")
    host.process(500, "shared")
    assert [t.name for t in host.discover()] == ["host", "alpha"]


def test_same_named_namespaces_are_told_apart_the_same_way_every_time(tmp_path: Path) -> None:
    """A restarted pod's new sandbox while the old one lingers: both are pod:shop/web."""
    host = FakeHost(tmp_path)
    first, second = host.namespace("old-sandbox"), host.namespace("new-sandbox")
    # The newer sandbox's processes have the lower pids, so /proc lists it first.
    host.process(
        610,
        "new-sandbox",
        kubepods_systemd(UID, "crio", container_id("new")),
        pod_files("web", "shop"),
    )
    host.process(
        620,
        "old-sandbox",
        kubepods_systemd(UID, "crio", container_id("old")),
        pod_files("web", "shop"),
    )
    lower, higher = sorted((first, second))
    for _ in range(3):
        named = host.by_name()
        assert named["pod:shop/web"].inode == lower
        assert named[f"pod:shop/web#{higher}"].inode == higher


def test_an_ip_netns_called_host_does_not_take_the_hosts_name(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    impostor = host.namespace("impostor")
    host.bind("host", "impostor")
    named = host.by_name()
    assert named["host"].path is None
    assert named[f"host#{impostor}"].path == str(host.run_netns / "host")


# -- select ----------------------------------------------------------------------------------


@pytest.fixture
def busy_node(tmp_path: Path) -> tuple[NetnsTarget, ...]:
    host = FakeHost(tmp_path)
    for index, (pod, namespace) in enumerate(
        (("web-1", "shop"), ("web-2", "shop"), ("coredns-5d", "kube-system"))
    ):
        label = f"{namespace}-{pod}"
        host.namespace(label)
        uid = pod_uid(label)
        host.bind(f"cni-{uid}", label)
        host.process(
            1000 + index,
            label,
            kubepods_systemd(uid, "cri-containerd", container_id(label)),
            pod_files(pod, namespace),
        )
    host.namespace("docker")
    host.process(2000, "docker", f"0::/system.slice/docker-{CID}.scope\n")
    host.namespace("lab")
    host.bind("lab", "lab")
    host.namespace("unshared")
    host.process(3000, "unshared")
    return host.discover()


def names(targets: tuple[NetnsTarget, ...]) -> list[str]:
    return [target.name for target in targets]


UNNAMED = "ns:<inode>"  # the unshared namespace's name, ns:<its inode>, in the cases below


def unnamed(targets: tuple[NetnsTarget, ...]) -> str:
    [found] = [t for t in targets if t.path is not None and t.path.endswith("/3000/ns/net")]
    return f"ns:{found.inode}"


def test_the_busy_node_as_discovered(busy_node: tuple[NetnsTarget, ...]) -> None:
    assert names(busy_node) == [
        "host",
        f"container:{CID[:12]}",
        "lab",
        unnamed(busy_node),
        "pod:kube-system/coredns-5d",
        "pod:shop/web-1",
        "pod:shop/web-2",
    ]


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (("self",), ["host"]),
        (("host",), ["host"]),
        (("pod:shop/*",), ["pod:shop/web-1", "pod:shop/web-2"]),
        (("pod:*/web-?",), ["pod:shop/web-1", "pod:shop/web-2"]),
        (("pod:kube-system/*", "lab"), ["lab", "pod:kube-system/coredns-5d"]),
        (("self", "container:*"), ["host", f"container:{CID[:12]}"]),
        (("ns:*",), [UNNAMED]),
        ((UNNAMED,), [UNNAMED]),  # its exact name is a pattern matching it: no brackets
        (("nothing-like-this",), []),
        (("Host",), []),  # case matters: names are labels
    ],
)
def test_select(
    busy_node: tuple[NetnsTarget, ...], selection: tuple[str, ...], expected: list[str]
) -> None:
    name = unnamed(busy_node)
    wanted = tuple(name if pattern == UNNAMED else pattern for pattern in selection)
    assert names(select(busy_node, wanted)) == [name if e == UNNAMED else e for e in expected]


def test_select_all(busy_node: tuple[NetnsTarget, ...]) -> None:
    assert select(busy_node, ("all",)) == busy_node


# -- entering ---------------------------------------------------------------------------------


def test_run_inside_our_own_namespace_runs_here(tmp_path: Path) -> None:
    here = NetnsTarget(name="host", inode=1, path=None)
    assert run_inside(here, threading.get_ident) == threading.get_ident()


def test_run_inside_a_vanished_handle_is_gone(tmp_path: Path) -> None:
    gone = NetnsTarget(name="ns:1", inode=1, path=str(tmp_path / "proc" / "99" / "ns" / "net"))
    with pytest.raises(NetnsGone):
        run_inside(gone, lambda: pytest.fail("ran inside a namespace that is gone"))


def test_run_inside_a_handle_that_now_leads_elsewhere_is_gone(tmp_path: Path) -> None:
    """The pid was reused, or `ip netns del` left its mount point file: never setns() there."""
    host = FakeHost(tmp_path)
    host.namespace("then")
    host.namespace("now")
    host.process(99, "now")
    stale = NetnsTarget(
        name="ns:1", inode=host.inode("then"), path=str(host.proc / "99" / "ns" / "net")
    )
    with pytest.raises(NetnsGone, match="no longer refers"):
        run_inside(stale, lambda: pytest.fail("entered a namespace discovery never saw"))
