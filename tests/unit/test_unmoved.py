"""The judgement that a namespace has not moved since its table was taken (sockets.py): only
then does a poll between destination scans dump its listeners alone and keep the rest."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from tcpwatch.model import FAMILIES, STATES, SocketTable
from tcpwatch.sources import procnet, sockets
from tcpwatch.sources.sockets import _still_true, _time_wait_expired

TCP = (10, 20, 0, 0, 5)  # ActiveOpens, PassiveOpens, AttemptFails, EstabResets, CurrEstab
QUIET = (900, 950, 0, 0, 0)  # InSegs, OutSegs, RetransSegs, InErrs, OutRsts


def marks(tw: int, inuse: tuple[int, int] = (11, 0), quiet: tuple[int, ...] = QUIET) -> tuple:
    """A ChurnMarks signature as read_churn_marks makes it."""
    return procnet.ChurnMarks(TCP, *inuse, (*quiet, tw)).signature


def table(time_wait: dict[str, int], tw: int, **states: int) -> SocketTable:
    counts = {family: dict.fromkeys(STATES, 0) for family in FAMILIES}
    counts["ipv4"].update(established=10, listen=1)
    for family, count in time_wait.items():
        counts[family]["time_wait"] = count
    for state, count in states.items():
        counts["ipv4"][state] = count
    return SocketTable(counts, (), (), (), (), {}, "derived", 0, marks=marks(tw))


def now(tw: int, inuse: tuple[int, int] = (11, 0), quiet: tuple[int, ...] = QUIET):
    return procnet.ChurnMarks(TCP, *inuse, (*quiet, tw))


def test_the_signature_ends_with_sockstat_tw() -> None:
    assert marks(7)[-1] == 7  # what _time_wait_expired reads as tw


def test_equal_marks_keep_the_table_as_it_was() -> None:
    earlier = table({"ipv4": 40}, 40)
    assert _still_true(earlier, now(40)) is earlier


def test_timewait_expiring_in_one_family_is_subtracted_there() -> None:
    earlier = table({"ipv4": 40}, 40)
    kept = _still_true(earlier, now(25))
    assert kept is not None
    assert kept.counts["ipv4"]["time_wait"] == 25  # 15 of the 40 expired
    assert (
        kept.counts["ipv4"]["established"] == 10 and kept.counts["ipv6"] == earlier.counts["ipv6"]
    )
    assert kept.marks == now(25).signature  # the next poll compares with what was read now
    six = table({"ipv6": 3}, 3)
    assert _still_true(six, now(0)).counts["ipv6"]["time_wait"] == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("earlier", "current", "why"),
    [
        (table({"ipv4": 40, "ipv6": 2}, 42), now(30), "both families hold timewait: split unknown"),
        (table({"ipv4": 40}, 40, fin_wait2=1), now(30), "a FIN_WAIT2 may be a timewait socket"),
        (table({"ipv4": 40}, 40), now(41), "a timewait socket was made"),
        (table({"ipv4": 40}, 40), now(30, inuse=(10, 0)), "a full socket went"),
        (table({"ipv4": 40}, 40), now(30, quiet=(901, *QUIET[1:])), "a segment came in"),
        (table({"ipv4": 5}, 5), now(0, inuse=(11, 1)), "an IPv6 socket was hashed"),
        (table({}, 7), now(3), "more expired than the table held"),
    ],
)
def test_anything_else_moving_makes_the_poll_walk(
    earlier: SocketTable, current: procnet.ChurnMarks, why: str
) -> None:
    assert _still_true(earlier, current) is None, why


def test_tables_that_cannot_vouch_are_never_kept() -> None:
    current = now(40)
    assert _still_true(None, current) is None
    earlier = table({"ipv4": 40}, 40)
    assert _still_true(replace(earlier, marks=()), current) is None  # taken while moving
    assert _still_true(replace(earlier, established_method="dumped"), current) is None
    assert _still_true(table({"ipv4": 40}, 40, syn_sent=1), current) is None  # a silent timer
    assert _time_wait_expired(earlier, current.signature[:-1]) is None  # another layout


def test_listeners_only_skips_families_without_full_sockets() -> None:
    """An idle namespace (inuse 0 in both families) needs no dump at all for its listeners."""

    class Unused(socket.socket):
        def send(self, *_: object, **__: object) -> int:
            raise AssertionError("dumped a family sockstat says has no socket")

    with Unused(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        listeners = sockets.collect(
            None, {"ipv4": 0, "ipv6": 0}, (), sock=sock, listeners_only=True
        )
    assert listeners.total("listen") == 0 and listeners.messages == 0
