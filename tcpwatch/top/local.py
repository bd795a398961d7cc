"""Whether `tcpwatch top` may read the daemon at the configured listen address without being told.

Anyone can listen on 127.0.0.1:9477 while no daemon runs, and answer a made-up API: root's `top`
would then show "no findings" on a host `check` calls CRITICAL. So `top` reads the local daemon
on its own only when the listener there can be verified (docs/security.md):

* every listening socket a connection to that address may reach (the address itself, or the
  wildcard of its port) belongs, as sock_diag reports its uid, to root, to the user running `top`,
  or to the user of a process of the system unit tcpwatch.service (its ``DynamicUser=``; only
  root places processes in /system.slice/tcpwatch.service);
* and, when /proc shows which process holds it, that process is tcpwatch.

Otherwise `top` polls the host itself and its header says why. ``--from URL`` is taken as given:
it names the server to read.

`check` asks the same daemon where the sockets' owners are (cli_owners.py) under the same rules,
but learns which process holds the listener from the daemon's own answer, confirmed with one
readlink (:func:`verify_claimed`), instead of walking every process' descriptors.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from tcpwatch.paths import ProcPaths
from tcpwatch.sources.lookup import (
    UNIT,
    Holder,
    ListeningSocket,
    SockDiagError,
    claimed_holders,
    holders,
    listening_sockets,
    unit_uids,
)


@dataclass(frozen=True, slots=True)
class Verdict:
    trusted: bool
    detail: str  # "daemon pid 812, uid 0" when trusted; why not otherwise


def reachable(listeners: Iterable[ListeningSocket], host: str) -> list[ListeningSocket]:
    """The listeners a connection to ``host`` on their port may reach: those bound to ``host``
    itself and the wildcards (``[::]`` too for an IPv4 host: a dual-stack socket takes it)."""
    wildcards = {"0.0.0.0", "::"} if ":" not in host else {"::"}
    return [s for s in listeners if s.address == host or s.address in wildcards]


def judge(
    listeners: Collection[ListeningSocket],
    me: int,
    unit: Collection[int],
    held_by: Mapping[int, Holder],
    where: str,
) -> Verdict:
    """Whether the ``listeners`` at ``where`` are a daemon `top` may read unasked."""
    if not listeners:
        return Verdict(False, f"no daemon listens at {where}")
    for sock in listeners:
        holder = held_by.get(sock.inode)
        if sock.uid not in (0, me) and sock.uid not in unit:
            return Verdict(
                False,
                f"the listener at {where} belongs to uid {sock.uid}: not root, not you, not "
                f"{UNIT}; --from {where} reads it anyway",
            )
        if holder is not None and not holder.is_tcpwatch:
            return Verdict(
                False,
                f"the listener at {where} is {holder.name}[{holder.pid}], not tcpwatch; "
                f"--from {where} reads it anyway",
            )
    first = next(iter(listeners))
    holder = held_by.get(first.inode)
    pid = f"pid {holder.pid}, " if holder is not None else ""
    return Verdict(True, f"daemon {pid}uid {first.uid}")


@dataclass(frozen=True, slots=True)
class Listening:
    """What listens where a local daemon is expected, judged on its owners' uids alone
    (``verdict``); which process holds it is the next step's (:func:`verify`,
    :func:`verify_claimed`)."""

    verdict: Verdict
    url: str
    listeners: tuple[ListeningSocket, ...] = ()
    unit: frozenset[int] = frozenset()


def listening_at(url: str, host: str, port: int, paths: ProcPaths) -> Listening:
    """The listeners a connection to ``url`` (``host``:``port``) may reach in this network
    namespace, and whether their uids may be trusted."""
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        return Listening(
            Verdict(False, f"{url} names a host, not an address: it cannot be verified"), url
        )
    try:
        listeners = reachable(listening_sockets(port), address)
    except (OSError, SockDiagError) as error:
        return Listening(Verdict(False, f"cannot verify the listener at {url}: {error}"), url)
    uids = {s.uid for s in listeners}
    unit = frozenset(unit_uids(paths)) if uids - {0, os.geteuid()} else frozenset()
    verdict = judge(listeners, os.geteuid(), unit, {}, url)
    return Listening(verdict, url, tuple(listeners), unit)


def verify(url: str, host: str, port: int, paths: ProcPaths) -> Verdict:
    """The verdict on the daemon at ``url`` (``host``:``port``) in this network namespace."""
    listening = listening_at(url, host, port, paths)
    if not listening.verdict.trusted:
        return listening.verdict
    held = holders(paths, [s.inode for s in listening.listeners])
    return judge(listening.listeners, os.geteuid(), listening.unit, held, url)


def verify_claimed(
    listening: Listening, paths: ProcPaths, claims: Mapping[int, tuple[int, str]]
) -> Verdict:
    """:func:`verify` without its walk of /proc/*/fd: the daemon says where it holds its
    listeners (``claims``: inode -> (pid, fd), from its own owners), each claim is confirmed
    with one readlink, and a listener whose holder is not confirmed so is not trusted (unlike
    :func:`verify`, which must accept a holder it could not see)."""
    if not listening.verdict.trusted:
        return listening.verdict
    wanted = {s.inode: claims[s.inode] for s in listening.listeners if s.inode in claims}
    held = claimed_holders(paths, wanted)
    unseen = [s for s in listening.listeners if s.inode not in held]
    if unseen:
        inode = unseen[0].inode
        where = wanted.get(inode)
        if where is not None and not os.access(paths.pid(where[0], "fd"), os.R_OK | os.X_OK):
            why = f"its descriptors (pid {where[0]}) are not ours to read"
        else:
            why = f"socket {inode}"
        return Verdict(
            False, f"the daemon at {listening.url} did not show that it holds its listener ({why})"
        )
    return judge(listening.listeners, os.geteuid(), listening.unit, held, listening.url)
