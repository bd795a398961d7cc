"""The `tcpwatch top` loop: curses on a terminal, one plain screen in batch mode.

Keys: q quit, n next namespace, s next listener sort, p (or space) pause, r refresh now. The
screen is laid out again on every refresh and every resize; a failed refresh keeps the last
screen and says why in the title row.
"""

from __future__ import annotations

import contextlib
import curses
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tcpwatch.errors import UsageError
from tcpwatch.render.api import LISTENER_SORTS
from tcpwatch.top.feed import Documents, Feed, LocalFeed
from tcpwatch.top.screen import Line, View, fit, layout

MAX_WIDTH = 512  # procps top's widest batch output (its -w)


def _columns_variable() -> int | None:
    text = os.environ.get("COLUMNS", "")
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def batch_width(requested: int | None) -> int:
    """Batch mode's width, as procps top picks it: ``-w N``; ``-w`` alone (0): COLUMNS, else
    MAX_WIDTH; no -w: COLUMNS, else the terminal's width when stdout is one, else MAX_WIDTH.
    A file or a pipe gets every line whole, up to MAX_WIDTH, never a terminal's 80 columns."""
    if requested:
        return requested
    columns = _columns_variable()
    if columns is None and requested is None and sys.stdout.isatty():
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    return max(20, min(columns or MAX_WIDTH, MAX_WIDTH))


def batch(feed: Feed, netns: str | None, sort: str, width: int) -> str:
    """One plain screen, every line (like `top -b -n 1`), ``width`` columns at most."""
    snapshot, findings = feed.fetch(netns, sort)
    view = View(netns=netns, sort=sort, source=feed.label, note=feed.note)
    lines = layout(snapshot, findings, view, width)
    return "\n".join(line.text.rstrip() for line in lines) + "\n"


def _styles(color: bool) -> Mapping[str, int]:
    bold = curses.A_BOLD
    styles = {"title": bold | curses.A_REVERSE, "heading": bold, "dim": curses.A_DIM}
    if not color:
        return {**styles, "critical": bold, "warning": bold, "info": 0, "ok": 0}
    curses.start_color()
    with contextlib.suppress(curses.error):
        curses.use_default_colors()
    pairs = {"critical": curses.COLOR_RED, "warning": curses.COLOR_YELLOW}
    pairs |= {"info": curses.COLOR_CYAN, "ok": curses.COLOR_GREEN}
    for number, (name, colour) in enumerate(pairs.items(), start=1):
        curses.init_pair(number, colour, -1)
        styles[name] = curses.color_pair(number) | (bold if name != "info" else 0)
    return styles


class _Loop:
    def __init__(
        self, screen: Any, feed: Feed, view: View, delay: float, color: bool, width: int | None
    ) -> None:
        self.screen = screen
        self.width = width  # -w N: at most this wide, as procps top narrows
        self.feed = feed
        self.view = view
        self.delay = delay
        self.styles = _styles(color)
        self.documents: Documents | None = None
        self.problem = ""
        self.next_fetch = 0.0

    def refresh(self) -> None:
        try:
            self.documents = self.feed.fetch(self.view.netns, self.view.sort)
            self.problem = ""
            if self.view.netns is None and self.documents[0].get("namespaces"):
                self.view = replace(self.view, netns=self.documents[0]["namespaces"][0]["netns"])
        except UsageError as error:
            self.problem = str(error)
        self.next_fetch = time.monotonic() + self.delay

    def draw(self) -> None:
        height, width = self.screen.getmaxyx()
        width = min(width, self.width + 1) if self.width else width
        self.screen.erase()
        lines: list[Line] = []
        if self.problem:
            lines.append(Line(f"refresh failed: {self.problem}", "critical"))
        if self.documents is not None:
            lines += layout(*self.documents, self.view, width - 1)
        for row, line in enumerate(fit(lines, width - 1, height)):
            with contextlib.suppress(curses.error):  # the bottom-right cell cannot be written
                self.screen.addstr(row, 0, line.text, self.styles.get(line.style, 0))
        self.screen.refresh()

    def key(self, key: int) -> bool:
        """Act on a key; False to quit."""
        if key in (ord("q"), ord("Q"), 27):
            return False
        if key in (ord("p"), ord(" ")):
            self.view = replace(self.view, paused=not self.view.paused)
        elif key == ord("s"):
            index = LISTENER_SORTS.index(self.view.sort)
            self.view = replace(self.view, sort=LISTENER_SORTS[(index + 1) % len(LISTENER_SORTS)])
            self.refresh()
        elif key == ord("n") and self.documents is not None:
            names = self.documents[0].get("netns_names") or []
            if names:
                index = names.index(self.view.netns) if self.view.netns in names else -1
                self.view = replace(self.view, netns=names[(index + 1) % len(names)])
                self.refresh()
        elif key == ord("r"):
            self.refresh()
        return True

    def run(self) -> None:
        curses.curs_set(0)
        self.screen.timeout(200)  # getch returns -1 after 200 ms: time to refresh
        self.refresh()
        self.draw()
        while True:
            key = self.screen.getch()
            if key != -1 and not self.key(key):
                return
            if not self.view.paused and time.monotonic() >= self.next_fetch:
                self.refresh()
            self.draw()  # also after KEY_RESIZE: the layout follows the new size


def interactive(
    feed: Feed, netns: str | None, sort: str, delay: float, width: int | None = None
) -> None:
    color = os.environ.get("NO_COLOR") is None
    view = View(netns=netns, sort=sort, source=f"{feed.label} - every {delay:g} s", note=feed.note)

    def main(screen: Any) -> None:
        _Loop(screen, feed, view, delay, color and curses.has_colors(), width).run()

    curses.wrapper(main)


def run_top(
    feed: Feed,
    netns: str | None,
    sort: str,
    delay: float,
    batch_mode: bool,
    width: int | None = None,
) -> int:
    """``width``: -w (None: not given; 0: given without a number)."""
    try:
        if batch_mode or not sys.stdout.isatty():
            if isinstance(feed, LocalFeed):
                feed.fetch(netns, sort)  # a first poll, so the printed one has rates
                time.sleep(1.0)
            sys.stdout.write(batch(feed, netns, sort, batch_width(width)))
            sys.stdout.flush()
        else:
            interactive(feed, netns, sort, delay, width)
    finally:
        feed.close()
    return 0
