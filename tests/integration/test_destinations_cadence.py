"""serve's per-destination cadence on the real kernel: a poll that reuses the latest
per-destination scan still counts every socket exactly, and copies fewer sockets out."""

from __future__ import annotations

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.snapshot import poll

from . import populations
from .netns import Netns

pytestmark = pytest.mark.integration


def test_reused_destinations_keep_counts_exact_and_skip_the_outbound_dump(netns: Netns) -> None:
    populations.established(netns, pairs=300, port=20101)
    populations.time_wait(netns, count=50, port=20102, closer="client")
    settings = CollectSettings(process_attribution=False)
    (fresh,) = poll(settings, (netns.name,))
    (reused,) = poll(settings, (netns.name,), earlier={netns.name: fresh.sockets})
    assert fresh.sockets is not None and reused.sockets is not None
    assert reused.sockets.counts == fresh.sockets.counts
    assert fresh.sockets.counts["ipv4"]["established"] == 600
    # The outbound ESTABLISHED dump (300 sockets) was not made; the scan is the earlier one.
    assert reused.sockets.messages <= fresh.sockets.messages - 300
    assert reused.sockets.ephemeral_use == fresh.sockets.ephemeral_use
    assert reused.sockets.destinations_at == fresh.sockets.destinations_at == fresh.taken_at
    (use,) = [u for u in fresh.sockets.ephemeral_use if u.port == 20101]
    assert use.sockets == 300
