"""OpenTelemetry SDK setup for kvpolicy's telemetry: console, JSON lines, OTLP, or in memory.

The library core (:mod:`kvpolicy.tracing`) depends on ``opentelemetry-api`` only; this module needs the
SDK (``pip install 'kvpolicy[trace]'``; OTLP also needs ``'kvpolicy[otlp]'``). It is what the CLI's
``--trace`` option uses::

    with telemetry_setup.setup("jsonl:trace.jsonl"):
        ...  # every kvpolicy.compress() block in here is traced to trace.jsonl

By default the providers are installed for kvpolicy only (:func:`kvpolicy.tracing.set_providers`) and
removed again by :meth:`Telemetry.shutdown`, so setups can follow one another in one process;
``install_global=True`` also makes them the process-wide OpenTelemetry providers (possible once).

The JSON-lines file holds one object per line: ``{"type": "span", ...}`` for each finished span (see
:func:`span_record`) and one ``{"type": "metrics", "data": ...}`` with the metrics when the setup shuts down.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvpolicy import tracing
from kvpolicy.errors import KVPolicyError

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (ConsoleMetricExporter, InMemoryMetricReader, MetricExporter,
                                                  MetricExportResult, MetricReader, MetricsData,
                                                  PeriodicExportingMetricReader)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor,
                                                SpanExporter, SpanExportResult)
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError as _exc:  # pragma: no cover - exercised only without the SDK
    class MissingSDKError(KVPolicyError, ImportError):
        """The OpenTelemetry SDK is not installed."""

    raise MissingSDKError(f"kvpolicy telemetry setup needs the OpenTelemetry SDK ({_exc}); install it with "
                          f"pip install 'kvpolicy[trace]' (or opentelemetry-sdk)") from _exc

TRACE_KINDS = ("console", "jsonl:PATH", "otlp", "otlp:URL")
_OTLP_EXPORT_INTERVAL_MS = 60_000.0  # OTLP: periodic metric export (and a final one at shutdown)
_AT_SHUTDOWN = math.inf  # console / jsonl: one metrics export, when the setup shuts down


class TelemetrySetupError(KVPolicyError, ValueError):
    """A ``--trace`` value is invalid or the exporter it needs is not installed."""


# --------------------------------------------------------------------------------------------- JSON lines
def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as the JSON object written to a ``jsonl`` trace (ids in hex, times in ns)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "type": "span",
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time_unix_nano": e.timestamp, "attributes": dict(e.attributes or {})}
                   for e in span.events],
        "scope": span.instrumentation_scope.name if span.instrumentation_scope is not None else None,
    }


class _JsonLinesFile:
    """A text file shared by the span and metric exporters (one JSON object per line, thread-safe)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[str] | None = path.open("w", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, records: Sequence[dict[str, Any]]) -> bool:
        with self._lock:
            if self._fh is None:
                return False
            for r in records:
                self._fh.write(json.dumps(r, default=str) + "\n")
            self._fh.flush()
            return True

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span to a JSON-lines file (see :func:`span_record`)."""

    def __init__(self, out: _JsonLinesFile) -> None:
        self._out = out

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        ok = self._out.write([span_record(s) for s in spans])
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """The file is closed by :meth:`Telemetry.shutdown`, after the last metrics are written."""


class JsonLinesMetricExporter(MetricExporter):
    """Appends each metrics collection to a JSON-lines file as ``{"type": "metrics", "data": ...}``."""

    def __init__(self, out: _JsonLinesFile) -> None:
        super().__init__()
        self._out = out

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        rec = {"type": "metrics", "data": json.loads(metrics_data.to_json(indent=None))}
        return MetricExportResult.SUCCESS if self._out.write([rec]) else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """See :meth:`JsonLinesSpanExporter.shutdown`."""


# --------------------------------------------------------------------------------------------- setup
@dataclass
class Telemetry:
    """Configured providers; :meth:`shutdown` flushes them and restores the previous ones."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    span_exporter: SpanExporter | None = None
    metric_reader: MetricReader | None = None
    description: str = ""
    _previous: tuple[Any, Any] = (None, None)
    _files: list[_JsonLinesFile] = field(default_factory=list)
    _closed: bool = False

    def shutdown(self) -> None:
        """Flush and stop both providers, close files, give kvpolicy back its previous providers."""
        if self._closed:
            return
        self._closed = True
        try:
            self.tracer_provider.force_flush()
            self.tracer_provider.shutdown()
            self.meter_provider.force_flush()  # console / jsonl export their metrics only here
            self.meter_provider.shutdown()
        finally:
            for f in self._files:
                f.close()
            if tracing.get_providers() == (self.tracer_provider, self.meter_provider):
                tracing.set_providers(*self._previous)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- in-memory helpers (setup("memory") / in_memory())
    def finished_spans(self) -> list[ReadableSpan]:
        """Spans held by an in-memory exporter, in the order they ended."""
        if not isinstance(self.span_exporter, InMemorySpanExporter):
            raise TelemetrySetupError(f"finished_spans() needs the in-memory exporter; this setup is "
                                      f"{self.description!r}")
        return list(self.span_exporter.get_finished_spans())

    def clear(self) -> None:
        """Forget the spans held so far (in-memory exporter)."""
        if isinstance(self.span_exporter, InMemorySpanExporter):
            self.span_exporter.clear()

    def metric_points(self) -> list[dict[str, Any]]:
        """Current metric points of an in-memory reader: ``{"name", "attributes", "value"}`` for counters,
        ``{"name", "attributes", "count", "sum"}`` for histograms (cumulative since the setup)."""
        if not isinstance(self.metric_reader, InMemoryMetricReader):
            raise TelemetrySetupError(f"metric_points() needs the in-memory reader; this setup is "
                                      f"{self.description!r}")
        data = self.metric_reader.get_metrics_data()
        out: list[dict[str, Any]] = []
        for rm in data.resource_metrics if data is not None else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        row: dict[str, Any] = {"name": m.name, "attributes": dict(p.attributes or {})}
                        if hasattr(p, "value"):
                            row["value"] = p.value
                        else:
                            row["count"], row["sum"] = p.count, p.sum
                        out.append(row)
        return out


def parse_trace_spec(spec: str) -> tuple[str, str | None]:
    """``"console"`` -> ("console", None); ``"jsonl:PATH"`` -> ("jsonl", PATH); ``"otlp[:URL]"``; ``"memory"``."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("console", "memory") and not arg:
        return kind, None
    if kind == "jsonl" and arg:
        return kind, arg
    if kind == "otlp":
        return kind, arg or None
    raise TelemetrySetupError(f"--trace {spec!r} is not understood; allowed: {', '.join(TRACE_KINDS)} "
                              f"(jsonl needs a file path, e.g. jsonl:trace.jsonl)")


def _otlp_exporters(url: str | None) -> tuple[SpanExporter, MetricExporter]:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TelemetrySetupError(
            f"--trace otlp needs the OTLP exporter, which is not installed ({exc}); install it with "
            f"pip install 'kvpolicy[otlp]' (or opentelemetry-exporter-otlp-proto-http), or use --trace "
            f"console / --trace jsonl:PATH") from exc
    if url:
        base = url.rstrip("/")
        return OTLPSpanExporter(endpoint=f"{base}/v1/traces"), OTLPMetricExporter(endpoint=f"{base}/v1/metrics")
    return OTLPSpanExporter(), OTLPMetricExporter()  # OTEL_EXPORTER_OTLP_* environment, else localhost:4318


def setup(spec: str, *, service_name: str | None = None, install_global: bool = False,
          stream: IO[str] | None = None) -> Telemetry:
    """Create SDK providers exporting to ``spec`` and point kvpolicy's telemetry at them.

    ``spec``: ``console`` (spans and metrics as JSON on ``stream``, default stderr), ``jsonl:PATH``
    (see the module docstring), ``otlp`` (OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``, default
    ``http://localhost:4318``) or ``otlp:URL``, ``memory`` (in-memory exporter and reader, for tests
    and benchmarks). Returns the :class:`Telemetry`; call its ``shutdown()`` (or use it as a context
    manager) to flush. ``service_name`` defaults to ``$OTEL_SERVICE_NAME``, else ``kvpolicy``.
    """
    kind, arg = parse_trace_spec(spec)
    service = service_name or os.environ.get("OTEL_SERVICE_NAME") or "kvpolicy"
    resource = Resource.create({"service.name": service})
    files: list[_JsonLinesFile] = []
    span_exporter: SpanExporter
    if kind == "memory":
        span_exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    elif kind == "console":
        out = stream if stream is not None else sys.stderr
        span_exporter = ConsoleSpanExporter(out=out)
        reader = PeriodicExportingMetricReader(ConsoleMetricExporter(out=out), export_interval_millis=_AT_SHUTDOWN)
    elif kind == "jsonl":
        f = _JsonLinesFile(Path(arg))
        files.append(f)
        span_exporter = JsonLinesSpanExporter(f)
        reader = PeriodicExportingMetricReader(JsonLinesMetricExporter(f), export_interval_millis=_AT_SHUTDOWN)
    else:
        span_exporter, metric_exporter = _otlp_exporters(arg)
        reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=_OTLP_EXPORT_INTERVAL_MS)
    tp = TracerProvider(resource=resource)
    processor = BatchSpanProcessor(span_exporter) if kind == "otlp" else SimpleSpanProcessor(span_exporter)
    tp.add_span_processor(processor)
    mp = MeterProvider(resource=resource, metric_readers=[reader])
    tel = Telemetry(tracer_provider=tp, meter_provider=mp, span_exporter=span_exporter, metric_reader=reader,
                    description=spec, _previous=tracing.get_providers(), _files=files)
    tracing.set_providers(tp, mp)
    if install_global:
        otel_trace.set_tracer_provider(tp)
        otel_metrics.set_meter_provider(mp)
    return tel


def in_memory(**kwargs: Any) -> Telemetry:
    """``setup("memory")``: spans in ``finished_spans()``, metrics in ``metric_points()``."""
    return setup("memory", **kwargs)
