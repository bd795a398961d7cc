"""What the live views say about each TCP state: its label, its meaning (quoted from the list in
docs/kernel-facts.md) and the rules whose findings colour it on the page's diagram."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class StateInfo:
    label: str  # as `ss` and the kernel source spell it
    meaning: str  # one sentence, as in docs/kernel-facts.md "The TCP states"
    rules: tuple[str, ...]  # rule ids whose findings touch this state


STATE_INFO: Mapping[str, StateInfo] = MappingProxyType(
    {
        "listen": StateInfo(
            "LISTEN",
            "a server socket waiting for connections; each completed handshake waits in its "
            "accept queue until the application calls `accept()`.",
            ("Q01", "Q02", "Q03", "K04", "K05", "P02"),
        ),
        "syn_sent": StateInfo(
            "SYN_SENT",
            "this side sent a SYN (`connect()`) and waits for the SYN-ACK; many of them towards "
            "one destination mean it is unreachable or filtering.",
            ("S03",),
        ),
        "syn_recv": StateInfo(
            "SYN_RECV",
            "a SYN arrived at a listener and the SYN-ACK went back; the request socket waits in "
            "the SYN queue for the client's final ACK.",
            ("Q04", "K01", "K02"),
        ),
        "established": StateInfo(
            "ESTABLISHED",
            "the handshake is done and data flows both ways.",
            ("S02", "P01"),
        ),
        "fin_wait1": StateInfo(
            "FIN_WAIT1",
            "this side closed first and sent its FIN; it waits for the peer to acknowledge it.",
            ("K07",),
        ),
        "fin_wait2": StateInfo(
            "FIN_WAIT2",
            "the peer acknowledged this side's FIN and this side waits for the peer's FIN; an "
            "orphaned socket leaves after `tcp_fin_timeout`.",
            ("K07", "K10"),
        ),
        "closing": StateInfo(
            "CLOSING",
            "both sides sent a FIN at the same time and this side waits for the ACK of its own.",
            ("K07",),
        ),
        "time_wait": StateInfo(
            "TIME_WAIT",
            "this side closed first and finished; the socket lingers 60 s (`TCP_TIMEWAIT_LEN`, "
            "not tunable) so late duplicates of the old connection die out.",
            ("K06", "K03", "K10", "P01"),
        ),
        "close_wait": StateInfo(
            "CLOSE_WAIT",
            "the peer closed its side and the kernel waits for the application to call "
            "`close()`; only the application can end this state, so a growing count is a leak.",
            ("S01",),
        ),
        "last_ack": StateInfo(
            "LAST_ACK",
            "the peer closed first, the application closed too, and this side waits for the ACK "
            "of its FIN.",
            ("K07",),
        ),
        "close": StateInfo(
            "CLOSE",
            "a socket that is not connected and not listening (`ss` shows UNCONN): created or "
            "bound but never used, or fully closed while still held.",
            (),
        ),
    }
)
