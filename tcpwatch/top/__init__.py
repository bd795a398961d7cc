"""`tcpwatch top`: a live terminal view of a daemon's JSON API, or of this host polled directly.

screen.py lays out one screen from the API's two documents (pure, tested without a terminal);
feed.py fetches them (from a daemon, or from a local Pipeline); app.py runs the curses loop and
the batch mode.
"""
