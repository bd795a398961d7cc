"""What each source read, as frozen data: one module per source, named after it, as
tcpwatch/sources/<name>.py reads it and tcpwatch/render/families/<name>.py renders it.

tcpwatch/model.py puts them together in the Snapshot and re-exports every name, so consumers
import from tcpwatch.model; these modules import nothing of tcpwatch but the base layer.
"""
