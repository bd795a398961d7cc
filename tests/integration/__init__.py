"""Integration tests: the real kernel, inside throw-away network namespaces."""
