"""/metrics bytes: which format a scraper gets, and renderings reused until the next poll.

**Negotiation** follows client_golang's `expfmt.Negotiate` (what exporter-toolkit serves): the
`Accept` entries are taken in order of their `q` (ties in the order given, `q=0` never), and the
first one naming a format tcpwatch writes wins: `application/openmetrics-text` with no version,
`1.0.0` or `2.0.0`; `text/plain` with no version, `0.0.4` or `1.0.0`. An entry with any other
version is passed over, and when nothing matches the text format 0.0.4 is served, never an
error: a scraper always gets a format it can read, and no header can make a request fail.
`escaping=` takes prometheus-client's four schemes (anything else means `underscores`).

**Caching.** The tcpwatch families depend only on the poll's ExportState, so they are collected
once per state and each format's bytes rendered once per state, keyed by the normalized format
(never by the raw header): at most a dozen renderings, dropped together when the next poll
publishes its state. Each family's bytes are kept as a slice of the rendering, so `?name[]=`
picks the families it names out of the cached bytes (a family only some of whose samples are
named is encoded afresh, alone), and gzip keeps, per rendering, the compressed bytes and the
compressor's state after them: a gzipped scrape compresses only the per-scrape self-metrics.
Responses share these bytes by reference; nothing per request is as big as the exposition.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector

from tcpwatch.state import ExportState

Chunk = bytes | memoryview
_EOF = b"# EOF\n"
_UNDERSCORES = "underscores"
_ESCAPINGS = (_UNDERSCORES, "allow-utf-8", "dots", "values")  # prometheus-client's schemes
_OPENMETRICS_VERSIONS = {"": "1.0.0", "1.0.0": "1.0.0", "2.0.0": "2.0.0"}
_TEXT_VERSIONS = {"": "0.0.4", "0.0.4": "0.0.4", "1.0.0": "1.0.0"}
_GZIP_LEVEL = 6


@dataclass(frozen=True, slots=True)
class Format:
    """One exposition format tcpwatch writes."""

    openmetrics: bool
    version: str  # "0.0.4", "1.0.0" (text); "1.0.0", "2.0.0" (OpenMetrics)
    escaping: str = _UNDERSCORES
    escaping_asked: bool = False  # whether the content type names it

    @property
    def content_type(self) -> str:
        kind = "application/openmetrics-text" if self.openmetrics else "text/plain"
        base = f"{kind}; version={self.version}; charset=utf-8"
        return f"{base}; escaping={self.escaping}" if self.escaping_asked else base

    @property
    def key(self) -> tuple[bool, str, str]:
        """What changes the bytes: the text format's version does not."""
        return (self.openmetrics, self.version if self.openmetrics else "", self.escaping)

    def encode(self, collector: Collector) -> bytes:
        if self.openmetrics:
            encoded: bytes = om_exposition.generate_latest(  # type: ignore[no-untyped-call]
                collector, escaping=self.escaping, version=self.version
            )
            return encoded
        return exposition.generate_latest(collector, escaping=self.escaping)


TEXT = Format(False, "0.0.4")


def negotiate(accept: str) -> Format:
    """The format for an ``Accept`` value (see the module's docstring); never raises."""
    entries: list[tuple[float, int, str, dict[str, str]]] = []
    for index, item in enumerate(accept.split(",")[:64]):
        media, *raw = item.split(";")
        params: dict[str, str] = {}
        for param in raw:
            name, _, value = param.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 0.0
        if q > 0:
            entries.append((-q, index, media.strip().lower(), params))
    for _, _, media, params in sorted(entries):
        version = params.get("version", "")
        escaping = params.get("escaping")
        if media == "application/openmetrics-text" and version in _OPENMETRICS_VERSIONS:
            return _format(True, _OPENMETRICS_VERSIONS[version], escaping, bool(version))
        if media == "text/plain" and version in _TEXT_VERSIONS:
            chosen = _TEXT_VERSIONS[version]
            return _format(False, chosen, escaping, chosen != "0.0.4")
    return TEXT


def _format(openmetrics_: bool, version: str, escaping: str | None, named: bool) -> Format:
    # As prometheus-client: the escaping is named only with an explicit version, and an
    # unknown scheme means underscores.
    chosen = escaping if escaping is not None and escaping in _ESCAPINGS else _UNDERSCORES
    return Format(openmetrics_, version, chosen if named else _UNDERSCORES, named)


class _Families(Collector):
    """Families collected once, handed to an encoder (described by name, as a registry wants)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def describe(self) -> list[Metric]:
        return self._families

    def collect(self) -> list[Metric]:
        return self._families


def _encode(fmt: Format, families: Iterable[Metric]) -> bytes:
    """Families in ``fmt``, without OpenMetrics' closing "# EOF"."""
    return fmt.encode(_Families(families)).removesuffix(_EOF)


def _sample_names(family: Metric) -> frozenset[str]:
    return frozenset(sample.name for sample in family.samples)


def _restricted(family: Metric, names: frozenset[str]) -> Metric | None:
    """The family with only the samples so named (prometheus-client's restricted registry)."""
    samples = [sample for sample in family.samples if sample.name in names]
    if not samples:
        return None
    restricted = Metric(family.name, family.documentation, family.type)
    restricted.unit = family.unit
    restricted.samples = samples
    return restricted


class _Rendering:
    """One format of one state: the bytes, each family's slice of them, gzip made on demand.

    ``earlier`` (the last state's rendering in this format) gives the bytes of each family
    object it also holds: a family reused from the last state (render/memo.py) is not encoded
    again."""

    def __init__(
        self, fmt: Format, families: Sequence[Metric], earlier: _Rendering | None = None
    ) -> None:
        encoded = earlier.encoded() if earlier is not None else {}
        pieces = [encoded.get(id(family)) or _encode(fmt, (family,)) for family in families]
        self.families = tuple(families)  # alive while the slices are: the ids stay theirs
        self.body = b"".join(pieces)
        view = memoryview(self.body)
        slices: list[memoryview] = []
        offset = 0
        for piece in pieces:
            slices.append(view[offset : offset + len(piece)])
            offset += len(piece)
        self.slices = tuple(slices)
        self._gzip: tuple[bytes, zlib._Compress] | None = None
        self._lock = threading.Lock()

    def encoded(self) -> dict[int, bytes]:
        """Each family object's bytes, by its id (valid while this rendering holds them)."""
        return {id(f): bytes(piece) for f, piece in zip(self.families, self.slices, strict=True)}

    def gzip(self) -> tuple[bytes, zlib._Compress]:
        """The body gzipped and flushed to a byte boundary, and the compressor to go on from."""
        with self._lock:
            if self._gzip is None:
                compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
                prefix = compressor.compress(self.body) + compressor.flush(zlib.Z_SYNC_FLUSH)
                self._gzip = (prefix, compressor)
            return self._gzip


class _StateRenderings:
    """Everything rendered for one ExportState."""

    def __init__(
        self,
        state: ExportState | None,
        families: Sequence[Metric],
        earlier: _StateRenderings | None = None,
    ) -> None:
        self.state = state
        self.families = tuple(families)
        self.names = tuple(_sample_names(family) for family in self.families)
        self._formats: dict[tuple[bool, str, str], _Rendering] = {}
        self._lock = threading.Lock()
        # The latest rendering in each format of an earlier state, for the families they
        # share (polls come more often than scrapes); one per format at most, not a chain.
        self._earlier: dict[tuple[bool, str, str], _Rendering] = {}
        if earlier is not None:
            with earlier._lock:
                self._earlier = {**earlier._earlier, **earlier._formats}

    def rendering(self, fmt: Format) -> _Rendering:
        # One lock: scrapes racing for the same rendering wait for the first, not render it too.
        with self._lock:
            rendering = self._formats.get(fmt.key)
            if rendering is None:
                rendering = _Rendering(fmt, self.families, self._earlier.pop(fmt.key, None))
                self._formats[fmt.key] = rendering
            return rendering


class Expositions:
    """Renders /metrics for the current state, reusing what an earlier scrape of it made.

    ``collect(state)`` gives the tcpwatch families of a state; ``self_metrics`` the per-scrape
    process metrics (collected on every call).
    """

    def __init__(
        self,
        collect: Callable[[ExportState | None], Sequence[Metric]],
        self_metrics: Collector,
    ) -> None:
        self._collect = collect
        self._self_metrics = self_metrics
        self._current: _StateRenderings | None = None
        self._lock = threading.Lock()

    def _for(self, state: ExportState | None) -> _StateRenderings:
        with self._lock:
            current = self._current
            if current is None or current.state is not state:
                # Replaced whole: the renderings of the last state go with it.
                current = _StateRenderings(state, self._collect(state), current)
                self._current = current
            return current

    def render(
        self, state: ExportState | None, fmt: Format, names: Sequence[str] = (), gzip: bool = False
    ) -> tuple[Chunk, ...]:
        """The body's parts (shared bytes first, then what this scrape adds)."""
        renderings = self._for(state)
        own = list(self._self_metrics.collect())
        if names:
            return self._filtered(renderings, fmt, frozenset(names), own, gzip)
        rendering = renderings.rendering(fmt)
        tail = fmt.encode(_Families(own))  # ends with "# EOF" in OpenMetrics
        if not gzip:
            return (rendering.body, tail)
        prefix, compressor = rendering.gzip()
        rest = compressor.copy()  # the compressor's state after the shared bytes
        return (prefix, rest.compress(tail) + rest.flush())

    @staticmethod
    def _filtered(
        renderings: _StateRenderings,
        fmt: Format,
        names: frozenset[str],
        own: list[Metric],
        gzip: bool,
    ) -> tuple[Chunk, ...]:
        rendering: _Rendering | None = None
        parts: list[Chunk] = []
        for index, family in enumerate(renderings.families):
            sample_names = renderings.names[index]
            if not sample_names & names:
                continue
            if sample_names <= names:
                rendering = rendering or renderings.rendering(fmt)
                parts.append(rendering.slices[index])
                continue
            restricted = _restricted(family, names)
            if restricted is not None:
                parts.append(_encode(fmt, (restricted,)))
        kept = [m for m in (_restricted(family, names) for family in own) if m is not None]
        tail = _encode(fmt, kept)
        parts.append(tail + _EOF if fmt.openmetrics else tail)
        if not gzip:
            return tuple(parts)
        compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
        compressed = [compressor.compress(part) for part in parts]
        return (*compressed, compressor.flush())
