"""The incident corpus as people read it: what was done, what happened, what to do.

docs/incidents.md is generated from these entries and from what `tcpwatch check` printed in each
incident's test (``tests/incidents/transcripts/<key>.txt``, written by the tests with
``TCPWATCH_RECORD_INCIDENTS=1``): the prose is written here, the output never by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Incident:
    key: str  # transcript name and anchor
    title: str
    test: str  # the test that stages it: tests/incidents/<module>::<function>
    setup: str  # the programs and the load, as run
    happened: str  # what the kernel and the programs did
    todo: str  # what a person paged for it should do
    limits: str = ""  # what TCP shows and what it does not, where that matters


INCIDENTS: tuple[Incident, ...] = (
    Incident(
        key="web-connection-limit",
        title="A web server at its connection limit",
        test="test_web.py::test_overflowing_nginx[connection-limit]",
        setup="nginx with `worker_connections 64` and `listen 127.0.0.1:8080 backlog=32`, "
        "driven by `wrk -c400` (keep-alive).",
        happened="nginx keeps only 64 connections; it accepts the others and closes idle ones "
        "to make room (its error log says `64 worker_connections are not enough`). Its accept "
        "queue of 32 overflows hundreds of times a second while nginx still accepts, so at any "
        "instant the queue may look half empty. wrk's SYNs are dropped at the listener, and its "
        "sockets wait in SYN_SENT for the kernel's retries.",
        todo="Raise `worker_connections` (and the file-descriptor limit with it, "
        "`worker_rlimit_nofile`) or add workers; raise the backlog (`listen ... backlog=N`, "
        "bounded by `net.core.somaxconn`) only to absorb bursts. The network is not at fault: "
        "the SYN_SENT sockets are the clients of this very listener.",
    ),
    Incident(
        key="web-tiny-backlog",
        title="A tiny backlog under a burst of new connections",
        test="test_web.py::test_overflowing_nginx[tiny-backlog]",
        setup="nginx with plenty of `worker_connections` but `listen 127.0.0.1:8080 backlog=8`, "
        "driven by `wrk -c200 -H 'Connection: close'` (a new connection per request).",
        happened="Connections arrive faster than one nginx worker's accept loop takes them off a "
        "queue of 8: the queue overflows between polls and drains again, and the SYN queue "
        "(sized by the same backlog) overflows into SYN cookies.",
        todo="Raise the listen backlog (`listen ... backlog=4096`; the kernel caps it at "
        "`net.core.somaxconn`) and reload nginx; with short connections consider keep-alive on "
        "the clients. Verify with `ss -ltnm`: the listener's `d` counter stops growing.",
    ),
    Incident(
        key="syn-flood-cookies",
        title="A SYN flood, with SYN cookies on",
        test="test_web.py::test_syn_flood[cookies]",
        setup="nginx on 127.0.0.1:8080 (backlog 128), `net.ipv4.tcp_syncookies=1` (the default), "
        "`hping3 -S --rand-source` sending about 5,000 SYNs a second from spoofed sources.",
        happened="The SYN queue fills with half-open connections from the spoofed sources; the "
        "kernel then answers with SYN cookies instead of queueing, so real clients still "
        "connect (`curl` got its 200 during the flood).",
        todo="Nothing is lost yet: keep SYN cookies on. Find the sources (`ss -tn state "
        "syn-recv`) and filter the flood upstream; a bigger backlog only helps real bursts.",
    ),
    Incident(
        key="syn-flood-no-cookies",
        title="A SYN flood, with SYN cookies off",
        test="test_web.py::test_syn_flood[no-cookies]",
        setup="As above with `net.ipv4.tcp_syncookies=0`.",
        happened="The SYN queue fills and every further SYN is dropped, real clients' included: "
        "`curl` could not connect during the flood.",
        todo="Turn SYN cookies back on (`sysctl -w net.ipv4.tcp_syncookies=1`), then as above.",
    ),
    Incident(
        key="proxy-dead-backend",
        title="A dead backend behind haproxy",
        test="test_proxy.py::test_dead_backend_behind_haproxy",
        setup="haproxy on 127.0.0.1:8081 (`option http-server-close`, `timeout connect 1s`) "
        "sends `/` to nginx on 127.0.0.1:8080 and `/api` to 127.0.0.1:9999, where nothing "
        "listens; `wrk -c20` on `/` and `curl --rate 10/s` asking `/api`.",
        happened="Every connect to 127.0.0.1:9999 is refused. haproxy closes a failed connect "
        "abortively, and the kernel then clears the destination port and the counters before "
        "reporting the socket's end: the failures arrive as connections to `127.0.0.1` with no "
        "port, next to tens of thousands of healthy connections to 127.0.0.1:8080 (and, with "
        "`http-server-close`, haproxy cuts its healthy server connections abortively too). "
        "The kernel's tracepoints saw each connect fail first, port and errno included "
        "(`sock:inet_sk_error_report`, dport 9999, ECONNREFUSED, by haproxy): joined to the "
        "destroy events by local port and address, the failures count under 127.0.0.1:9999, "
        "refused, judged apart from the healthy backend.",
        todo="Start the backend haproxy cannot reach, or take it out of the pool (`show "
        "servers state` on its stats socket, or its log: `Connection refused`).",
        limits="Without the tracepoints (no CAP_PERFMON or tracefs, or `collect.tracepoints: "
        "false`) the destroy events alone name the address, not the port, and cannot tell "
        "refused from timed-out connects; haproxy is then named as the likely client because "
        "it listens in the namespace and is known to close failed connects this way.",
    ),
    Incident(
        key="proxy-blackholed-backend",
        title="A black-holed backend behind haproxy",
        test="test_proxy.py::test_blackholed_backend_behind_haproxy",
        setup="haproxy in one namespace sends `/` to nginx in a second namespace "
        "(10.77.0.2:8080, over a veth pair); that host's nftables drops every SYN to 8080. "
        "`wrk -c40` on haproxy.",
        happened="The SYNs vanish: haproxy's connects wait in SYN_SENT until `timeout connect "
        "1s`, then haproxy closes them abortively (port cleared again). The tracepoints saw "
        "each connect to 10.77.0.2:8080 given up by haproxy with no answer: joined to the "
        "destroy events, they are timeouts of 10.77.0.2:8080, and here the network (the "
        "backend host's firewall) is the cause.",
        todo="The path or the backend host drops the SYNs: check the backend host's firewall "
        "(`nft list ruleset`), security groups and routes, from the proxy with "
        "`tcpdump 'host 10.77.0.2 and tcp[tcpflags] & tcp-syn != 0'`.",
    ),
    Incident(
        key="database-connection-limit",
        title="A database at its connection limit",
        test="test_database.py::test_postgres_at_max_connections",
        setup="PostgreSQL with `max_connections = 20`: `pgbench -c 19` holds 19 sessions and "
        "`psql` connects in a loop.",
        happened="Every further session is refused by PostgreSQL itself: the TCP handshake "
        "completes, the server sends `FATAL: sorry, too many clients already` and closes.",
        todo="Read the server's log or `SELECT count(*) FROM pg_stat_activity`; pool the "
        "clients (pgbouncer) or raise `max_connections` with the memory it costs.",
        limits="TCP cannot see this limit: the kernel completes every handshake and the "
        "refusal is an application message. tcpwatch stays quiet rather than blame the "
        "network; what it does show is the short-lived connections to 127.0.0.1:5432 in "
        "`tcpwatch_connections_closed_total`.",
    ),
    Incident(
        key="database-close-wait-leak",
        title="CLOSE_WAIT left by a database whose clients gave up",
        test="test_database.py::test_postgres_close_wait",
        setup="PostgreSQL with 60 sessions each running a long query (`pg_sleep(60)`, standing "
        "for a slow query or a lock wait), started by `pgbench -c 60`; then the client is "
        "killed, as a client with a timeout gives up.",
        happened="The clients' FINs arrive, but each PostgreSQL backend is busy in its query and "
        "does not read its socket: 60 sockets sit in CLOSE_WAIT, one per backend process, "
        "until the queries end.",
        todo="Cancel the orphaned queries (`SELECT pg_terminate_backend(pid) FROM "
        "pg_stat_activity WHERE ...`); set `client_connection_check_interval` (PostgreSQL 14+) "
        "so backends notice gone clients, and `statement_timeout` so queries end.",
    ),
    Incident(
        key="ports-exhaustion",
        title="Ephemeral ports exhausted by a client without connection reuse",
        test="test_ports.py::test_client_exhausts_ephemeral_ports",
        setup="redis-server on 127.0.0.1:6379; `redis-benchmark -k 0` (a new connection per "
        "request) with `ip_local_port_range` 40000-40999 and `tcp_tw_reuse=0` (as towards a "
        "server on another host).",
        happened="The client closes first, so each closed connection holds its local port in "
        "TIME_WAIT for 60 s; after about a thousand connections `connect()` fails with "
        "`Cannot assign requested address`.",
        todo="Reuse connections in the client (`-k 1`, a pool); then widen the port range, or "
        "allow `tcp_tw_reuse=1` for outgoing connections.",
    ),
)


def by_key(key: str) -> Incident:
    return next(incident for incident in INCIDENTS if incident.key == key)
