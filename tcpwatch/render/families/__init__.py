"""The Prometheus metric families, one module per source that produces them.

Each module is named after its source (``sockstat.py`` renders what the ``sockstat`` source
read) and declares its families with :func:`~tcpwatch.render.families.base.family`;
``pipeline.py`` renders what the pipeline itself keeps (findings, each source's health, poll
durations). ``registry.py`` finds them all by importing this package's modules, so the
exposition (``tcpwatch/render/prometheus.py``) keeps no list.
"""
