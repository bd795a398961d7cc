"""tcpwatch: TCP connection-health monitor for Linux hosts."""

__version__ = "0.1.0"
