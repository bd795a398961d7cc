"""Names for network namespaces, and who lives in them (containers, Kubernetes pods).

A network namespace is identified by the inode of its nsfs file; every handle on it has that
inode: ``/proc/PID/ns/net`` of each member process and each ``ip netns`` bind mount::

    /proc/self/ns/net -> net:[4026532247]
    /run/netns/blue        (nsfs bind mount, st_ino 4026532247)

Names, first match wins: ``host`` for the initial namespace, the ``ip netns`` name, then
``ns:<INODE>``: the number is the namespace's own, fixed while it exists, whichever of its
processes come and go (a member's pid would change the name, and every series with it, when that
process restarts while another keeps the namespace alive).

Discovery (every namespace on the host, for ``--netns all``) also names a namespace after the
container or Kubernetes pod its member processes belong to (``pod:<namespace>/<name>``,
``container:<id>``): see :func:`choose_name` and docs/namespaces.md.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
from dataclasses import dataclass

from tcpwatch.paths import ProcPaths, read_text

NET_NS_INIT_INO = 0xEFFFFFF9
INODE_PREFIX = "ns:"  # ns:4026532384: the name of a namespace that has no other
RUN_NETNS_DIR = "/run/netns"


def current_netns_inode(paths: ProcPaths) -> int:
    """Inode of the network namespace this process is in (``/proc/self/ns/net``)."""
    return os.stat(paths.pid("self", "ns", "net")).st_ino


def netns_name(paths: ProcPaths, inode: int, run_netns_dir: str = RUN_NETNS_DIR) -> str:
    """A name for the network namespace whose nsfs inode is ``inode``; handles we may not read
    are skipped.

    ``host`` is the initial namespace (by its fixed inode) or the one PID 1 of our procfs is in:
    on kernels before 6.18 that is the only clue, and in a container with its own PID namespace
    PID 1 is the container's init, whose namespace is then called ``host`` too.
    """
    if inode == NET_NS_INIT_INO or inode == inode_of(paths.pid(1, "ns", "net")):
        return "host"
    named = ip_netns_name(inode, run_netns_dir)
    if named is not None:
        return named
    return inode_name(inode)


def inode_name(inode: int) -> str:
    """The name of a namespace nobody named: its nsfs inode, as ``lsns -t net`` and
    ``stat -L -c %i /proc/PID/ns/net`` print it (no brackets: a ``--netns`` pattern and a PromQL
    regex take it as it is)."""
    return f"{INODE_PREFIX}{inode}"


def own_netns_name(paths: ProcPaths) -> str:
    """The name of the namespace this process is in; "unknown" when /proc/self is unreadable."""
    try:
        return netns_name(paths, current_netns_inode(paths))
    except OSError:
        return "unknown"


def name_rank(name: str) -> int:
    """How much a name says, in :func:`choose_name`'s order: a failed read only ever gives a
    lower rank (``host`` -> ``ns:<inode>`` when /proc/1 is unreadable, anything -> ``unknown``)."""
    base = name.partition("#")[0]  # "blue#4026532247": two namespaces shared a name
    if base == "host":
        return 7
    if base == "unknown":
        return 0
    for rank, prefix in ((1, INODE_PREFIX), (4, "container:"), (5, "pod:")):
        if base.startswith(prefix):
            return rank
    return 3 if _RUNTIME_PIN.search(base) else 6  # a runtime's UUID pin, or a chosen name


class NetnsNames:
    """The name each namespace was last given, so a transient procfs failure does not rename it.

    A fresh name replaces the remembered one only if it says at least as much
    (:func:`name_rank`): ``host`` stays ``host`` while /proc/1 is unreadable, a pod stays a pod
    while its hostname is, and the series keep their ``netns`` label. Names are remembered per
    nsfs inode, and for the namespace tcpwatch runs in also without one (/proc/self unreadable).
    Used by one thread (the poll); :meth:`keep` forgets the namespaces a poll no longer saw.
    """

    def __init__(self) -> None:
        self._by_inode: dict[int, str] = {}
        self._own: str | None = None

    def settle(self, inode: int, fresh: str, own: bool = False) -> str:
        """The name to give the namespace ``inode`` (0: unknown) whose fresh name is ``fresh``."""
        remembered = self._by_inode.get(inode) if inode else None
        if remembered is None and own:
            remembered = self._own
        name = fresh
        if remembered is not None and name_rank(fresh) < name_rank(remembered):
            name = remembered
        if inode:
            self._by_inode[inode] = name
        if own:
            self._own = name
        return name

    def keep(self, inodes: set[int]) -> None:
        """Forget every namespace but these (the ones the latest poll saw)."""
        self._by_inode = {i: n for i, n in self._by_inode.items() if i in inodes}


def ip_netns_name(inode: int, run_netns_dir: str = RUN_NETNS_DIR) -> str | None:
    """The ``ip netns`` name bound to ``inode`` (alphabetically first if several are)."""
    try:
        names = sorted(os.listdir(run_netns_dir))
    except OSError:
        return None
    for name in names:
        if inode_of(os.path.join(run_netns_dir, name)) == inode:
            return name
    return None


def inode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:  # gone, or not ours to read (PID 1 of a more privileged sandbox)
        return None


# Container ids in cgroup paths, as Docker, containerd (CRI), CRI-O and Podman write them:
# .../docker-<id>.scope, /docker/<id>, .../cri-containerd-<id>.scope, .../crio-<id>.scope,
# .../libpod-<id>.scope/container, /kubepods/<qos>/pod<uid>/<id>. Lookarounds, so that ids nested
# in one path (a kind node's container holding a pod's) are all found.
_CONTAINER_ID = re.compile(r"(?:^|(?<=[/-]))([0-9a-f]{64})(?=(?:\.scope)?(?:/|$))", re.MULTILINE)
# Pod UID: kubepods-besteffort-pod<uid with _>.slice (systemd driver) or /pod<uid>/ (cgroupfs).
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
# A UUID in an ip netns name marks a runtime's pin, not a name a person chose: containerd
# (cni-<uuid>), CRI-O (<uuid>) and Podman (netns-<uuid>) bind pod namespaces under /run/netns.
_RUNTIME_PIN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Kubernetes object names: a pod's is a DNS-1123 subdomain, a namespace's a DNS-1123 label.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
SERVICE_ACCOUNT_NAMESPACE = "var/run/secrets/kubernetes.io/serviceaccount/namespace"
MEMBERS_READ = 16  # member processes whose cgroup and files are read per namespace
SMALL_FILE_LIMIT = 4096  # bytes read from a container's hostname, namespace or resolv.conf

# openat2(2): one syscall number on every architecture with the common table (Linux >= 5.6).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


@dataclass(frozen=True, slots=True)
class Identity:
    """Container and pod of a namespace's member processes; empty strings when none tells."""

    container: str = ""
    pod: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""


def container_in_cgroup(text: str) -> tuple[str, str] | None:
    """The container id (first 12 hex digits) and pod UID that a ``/proc/PID/cgroup`` names.

    ``None`` when no line names a container; the pod UID is ``""`` outside Kubernetes. Within a
    line the innermost container wins (a pod inside a kind node's container); a systemd-style
    UID (``_``) is given with ``-``. Example (cgroup v2, containerd with the systemd driver)::

        0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod6b4b1c9a_8d1e_4a4c_
        9f07_1f2d3c4b5a69.slice/cri-containerd-3f1c...<64 hex digits>.scope

    (one line in the file) gives ``("3f1c........", "6b4b1c9a-8d1e-4a4c-9f07-1f2d3c4b5a69")``.
    """
    for line in text.splitlines():
        ids = _CONTAINER_ID.findall(line)
        if not ids:
            continue
        uids = _POD_UID.findall(line)
        return ids[-1][:12], uids[-1].replace("_", "-") if uids else ""
    return None


def pod_namespace_from_resolv_conf(text: str) -> str:
    """The pod's namespace from the search list kubelet writes into its /etc/resolv.conf.

    Kubelet's list (dnsPolicy ClusterFirst) starts ``<namespace>.svc.<domain> svc.<domain>``;
    anything else gives ``""``. Example::

        search shop.svc.cluster.local svc.cluster.local cluster.local
        nameserver 10.96.0.10

    gives ``"shop"``.
    """
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "search":
            continue
        first, second = words[1], words[2]
        namespace, dot, rest = first.partition(".")
        if (
            dot
            and rest.startswith("svc.")
            and rest == second
            and _DNS_LABEL.fullmatch(namespace) is not None
        ):
            return namespace
    return ""


def container_identity(paths: ProcPaths, pids: list[int]) -> Identity:
    """Container id and pod of the first member process whose cgroup names one (best effort).

    The pod UID is in the cgroup path; its name and namespace are not, so they come from a
    member's /etc/hostname and mounted service-account namespace file (else its resolv.conf
    search list), read through /proc/PID/root (needs CAP_SYS_PTRACE for other users'
    processes).
    """
    for pid in pids[:MEMBERS_READ]:
        try:
            cgroup = read_text(
                paths.pid(pid, "cgroup"), SMALL_FILE_LIMIT * 4, encoding="utf-8", errors="replace"
            )
        except OSError:
            continue
        found = container_in_cgroup(cgroup)
        if found is None:
            continue
        container, pod_uid = found
        if not pod_uid:
            return Identity(container=container)
        pod, pod_namespace = _pod_name(paths, pids)
        return Identity(container, pod, pod_namespace, pod_uid)
    return Identity()


def _pod_name(paths: ProcPaths, pids: list[int]) -> tuple[str, str]:
    """(pod name, pod namespace) from the members' root filesystems; "" for what none tells."""
    pod = pod_namespace = ""
    for member in pids[:MEMBERS_READ]:
        root = paths.pid(member, "root")
        if not pod:
            pod = _valid(read_inside_root(root, "etc/hostname"), _DNS_SUBDOMAIN)
        if not pod_namespace:
            pod_namespace = _valid(
                read_inside_root(root, SERVICE_ACCOUNT_NAMESPACE), _DNS_LABEL
            ) or pod_namespace_from_resolv_conf(read_inside_root(root, "etc/resolv.conf"))
        if pod and pod_namespace:
            break
    return pod, pod_namespace


def _valid(text: str, pattern: re.Pattern[str]) -> str:
    """The first line of ``text`` if it is a well-formed name, else "" (it becomes a label)."""
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    return first if pattern.fullmatch(first) else ""


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def read_inside_root(root: str, relative: str, limit: int = SMALL_FILE_LIMIT) -> str:
    """Up to ``limit`` bytes of the regular file ``relative`` below ``root``; "" if unreadable.

    ``root`` is a container's /proc/PID/root, a tree its owner controls: symlinks in it resolve
    as if ``root`` were ``/`` (openat2 RESOLVE_IN_ROOT), so ``etc/hostname -> /etc/shadow``
    reads the container's own file, never the host's, and image links such as
    ``/var/run -> /run`` lead where the container sees them. FIFOs and devices are refused
    (opened non-blocking, checked with fstat), so a hostile file can neither block nor flood us.
    """
    try:
        directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        descriptor = _openat2(
            directory,
            relative,
            os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY,
            _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS,
        )
    except OSError:  # missing, not ours to read, or a kernel before 5.6 (ENOSYS)
        return ""
    finally:
        os.close(directory)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return ""
        return os.read(descriptor, limit).decode("utf-8", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(descriptor)


def _openat2(directory: int, relative: str, flags: int, resolve: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags, 0, resolve)
    descriptor: int = libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(directory),
        ctypes.c_char_p(os.fsencode(relative)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if descriptor < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), relative)
    return descriptor


def choose_name(inode: int, is_host: bool, ip_name: str | None, identity: Identity) -> str:
    """A discovered namespace's name, first match wins: ``host``; the ``ip netns`` name, unless
    it is a runtime's UUID pin of a container's namespace; ``pod:<namespace>/<name>``;
    ``container:<id>``; a runtime's pin name; ``ns:<INODE>``.
    """
    if is_host:
        return "host"
    runtime_pin = ip_name is not None and _RUNTIME_PIN.search(ip_name) is not None
    if ip_name is not None and not (runtime_pin and identity.container):
        return ip_name
    if identity.pod and identity.pod_namespace:
        return f"pod:{identity.pod_namespace}/{identity.pod}"
    if identity.container:
        return f"container:{identity.container}"
    if ip_name is not None:
        return ip_name
    return inode_name(inode)
