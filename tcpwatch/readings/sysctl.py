"""What the sysctl source read: the TCP tunables under /proc/sys/net (the snapshot's
``sysctls``), and the field names of the sysctls that hold several integers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Sysctls holding several integers, and what each field is called (the suffix of its series in
# tcpwatch_sysctl). Every other sysctl holds exactly one integer.
MULTI_FIELD_SUFFIXES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "net.ipv4.ip_local_port_range": ("min", "max"),
        "net.ipv4.tcp_mem": ("min", "pressure", "max"),
        "net.ipv4.tcp_rmem": ("min", "default", "max"),
        "net.ipv4.tcp_wmem": ("min", "default", "max"),
    }
)


@dataclass(frozen=True, slots=True)
class Sysctls:
    """TCP tunables. A sysctl the kernel lacks is absent from ``values``."""

    values: Mapping[str, tuple[int, ...]]  # dotted name -> its integer fields
    reserved_ports: tuple[tuple[int, int], ...] = ()  # ip_local_reserved_ports as ranges
    # False when the file exists but could not be used: which ports are reserved is unknown,
    # and reserved_ports (then empty) must not be read as "none".
    reserved_ports_known: bool = True

    def get(self, name: str, index: int = 0) -> int | None:
        fields = self.values.get(name)
        if fields is None or index >= len(fields):
            return None
        return fields[index]

    @property
    def port_range(self) -> tuple[int, int] | None:
        fields = self.values.get("net.ipv4.ip_local_port_range")
        if fields is None or len(fields) != 2:
            return None
        return fields[0], fields[1]

    def port_reserved(self, port: int) -> bool:
        """Whether ``port`` is reserved; False also when that is unknown (reserved_ports_known)."""
        return any(low <= port <= high for low, high in self.reserved_ports)

    def named_fields(self) -> tuple[tuple[str, int], ...]:
        """Each field under its own name, sorted by sysctl: ``net.core.somaxconn`` for a
        one-field sysctl, ``net.ipv4.tcp_mem.min`` / ``.pressure`` / ``.max`` for the fields of
        :data:`MULTI_FIELD_SUFFIXES`. A value with the wrong number of fields is left out."""
        named: list[tuple[str, int]] = []
        for name, fields in sorted(self.values.items()):
            suffixes = MULTI_FIELD_SUFFIXES.get(name)
            if suffixes is None or len(suffixes) != len(fields):
                if len(fields) == 1:
                    named.append((name, fields[0]))
                continue
            pairs = zip(suffixes, fields, strict=True)
            named.extend((f"{name}.{suffix}", value) for suffix, value in pairs)
        return tuple(named)
