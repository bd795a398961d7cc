"""The HTTP server's limits, and the descriptor budget they must fit in.

Every connection costs a descriptor, and so does every source: a netlink socket and a namespace
handle per watched namespace, the /proc files of a poll, long-lived sources' sockets. A flood of
connections must never take the descriptors the sources need, so the server caps its connections
well below the process's limit (RLIMIT_NOFILE) and refuses to start when the limit leaves too
little room for both.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from tcpwatch.errors import UsageError

log = logging.getLogger(__name__)

HEADER_DEADLINE_SECONDS = 10.0  # a request's line and headers, whole, from its first byte
IDLE_SECONDS = 60.0  # a kept-alive connection waiting for its next request
# A response, whole, must be taken by the client within this; no thread waits for it meanwhile.
WRITE_TIMEOUT_SECONDS = 10.0
MAX_HEADER_BYTES = 32 * 1024  # request line and headers; more gets 431
WORKERS = 8  # threads answering complete requests
READY_QUEUE = 64  # requests without remembered credentials waiting for a worker ...
DEFERRED = 256  # ... more wait parked (unread, no thread) for room; more still get a quick 503
MAX_CONNECTIONS = 512  # at most; lower when the descriptor limit is low
SOURCE_DESCRIPTORS = 256  # kept for the sources, whatever the connections do
MIN_CONNECTIONS = 64
SHED_FRACTION = 32  # at the cap, close up to 1/32 of it at once (as nginx drains 32 at a time)


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    limit: int  # RLIMIT_NOFILE's soft limit after raising it to the hard one
    raised_from: int
    max_connections: int


def descriptor_budget(max_connections: int = MAX_CONNECTIONS) -> DescriptorBudget:
    """Raise the soft descriptor limit to the hard one and share it out; UsageError if too low.

    Connections get at most half of the descriptors, so the sources keep the other half (at
    least SOURCE_DESCRIPTORS) however many clients connect.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised_from = soft
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    connections = min(max_connections, soft // 2, soft - SOURCE_DESCRIPTORS)
    if connections < MIN_CONNECTIONS:
        needed = SOURCE_DESCRIPTORS + MIN_CONNECTIONS
        raise UsageError(
            f"the descriptor limit (RLIMIT_NOFILE) is {soft}: tcpwatch serve needs at least "
            f"{needed} ({SOURCE_DESCRIPTORS} for its sources, {MIN_CONNECTIONS} for HTTP "
            "connections); raise it (LimitNOFILE= in the systemd unit, `ulimit -n` in a shell)"
        )
    return DescriptorBudget(soft, raised_from, connections)


def describe(budget: DescriptorBudget) -> str:
    raised = f" (raised from {budget.raised_from})" if budget.raised_from != budget.limit else ""
    return (
        f"descriptor limit {budget.limit}{raised}: up to {budget.max_connections} HTTP "
        f"connections, the rest kept for the sources"
    )
