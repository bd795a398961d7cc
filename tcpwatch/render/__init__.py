"""Renderers: each takes the pipeline's state (snapshots, findings) and returns bytes or text.

prometheus  the /metrics exposition: the families declared in families/, one module per source
text        the `tcpwatch check` report for people
json        the `tcpwatch check --format json` report for programs
html        the landing page of `tcpwatch serve`

A renderer never polls and never touches the network; it formats what it is given.
"""
