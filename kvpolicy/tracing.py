"""OpenTelemetry instrumentation (API only: a no-op unless the application configures an SDK).

Contract (see ``docs/tracing.md``):

* span ``kvpolicy.generate`` for each :func:`kvpolicy.compress` block, with ``kvpolicy.policy``; when it
  ends (and only if it is recorded) it also carries the cache's final per-layer report as arrays
  ``kvpolicy.report.<field>`` (one item per layer), which ``kvpolicy trace-summary`` renders;
* span ``kvpolicy.compress`` for each (layer, event), a child of ``kvpolicy.generate``, with the
  attributes of :meth:`CompressionEvent.attributes` (``kvpolicy.layer``, ``kvpolicy.phase``,
  ``kvpolicy.event``, ``kvpolicy.tokens_in`` ...). Token counts are summed over the rows of the batch
  (``kvpolicy.batch`` says how many). An exception raised while compressing is recorded on the span
  (status ERROR, an ``exception`` event), the attributes known before it are kept, and it is re-raised;
* metrics: counters ``kvpolicy.tokens_dropped`` and ``kvpolicy.tokens_merged`` and a histogram
  ``kvpolicy.compress.duration`` (seconds), labelled ``kvpolicy.policy`` and ``kvpolicy.phase``,
  recorded once per completed compression.

Tracer and meter come from the global OpenTelemetry providers unless :func:`set_providers` names
others (tests, or an application that keeps kvpolicy's telemetry apart).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from opentelemetry import metrics, trace

from kvpolicy.errors import KVPolicyError

INSTRUMENTATION = "kvpolicy"
PREFIX = "kvpolicy."
GENERATE_SPAN = "kvpolicy.generate"
COMPRESS_SPAN = "kvpolicy.compress"
REPORT_PREFIX = "kvpolicy.report."

_Scalar = (bool, int, float, str)
#: event fields only known once a compression has completed (left off a failed span)
RESULT_FIELDS = frozenset({"tokens_kept", "tokens_merged", "tokens_dropped", "image_tokens_kept", "bytes_after",
                           "figures"})
#: histogram buckets (seconds) for one layer's compression: 0.1 ms .. 10 s
DURATION_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class CompressionEvent:
    """What one compression of one layer did; the cache's report and the spans share it.

    Token counts and bytes are summed over the rows of the batch.
    """

    layer: int
    phase: str  # "prefill" or "decode"
    policy: str
    scorer: str
    merger: str
    event: str = "compress"  # compress (prefill) | compact (rolling decode) | fixed-point | ...
    batch: int = 1
    tokens_in: int = 0
    tokens_kept: int = 0
    tokens_merged: int = 0
    tokens_dropped: int = 0
    image_tokens_in: int = 0
    image_tokens_kept: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)  # the policy's own figures (CompressionContext.figures)

    def attributes(self) -> dict[str, Any]:
        """Span attributes: every field as ``kvpolicy.<field>``, then the figures that OpenTelemetry can
        carry (scalars, homogeneous lists of scalars, 0-d tensors) as ``kvpolicy.<figure>``; a figure never
        overrides a field."""
        out: dict[str, Any] = {PREFIX + f.name: getattr(self, f.name) for f in fields(self) if f.name != "figures"}
        for name, value in self.figures.items():
            key = PREFIX + str(name)
            v = attribute_value(value)
            if v is not None and key not in out:
                out[key] = v
        return out


def attribute_value(value: Any) -> Any:
    """``value`` as an OpenTelemetry attribute value, or None when it has no such form."""
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # torch / numpy
        value = value.tolist()
    if isinstance(value, _Scalar):
        return value
    if isinstance(value, (list, tuple)) and value:
        kinds = {bool if isinstance(x, bool) else int if isinstance(x, int) else type(x) for x in value}
        if kinds <= {int} or kinds <= {bool} or kinds <= {str}:
            return list(value)
        if kinds <= {int, float}:
            return [float(x) for x in value]
    return None


# --------------------------------------------------------------------------------------------- providers
_tracer_provider: trace.TracerProvider | None = None
_meter_provider: metrics.MeterProvider | None = None
_tracer: trace.Tracer | None = None
_instruments: _Instruments | None = None


def set_providers(tracer_provider: trace.TracerProvider | None = None,
                  meter_provider: metrics.MeterProvider | None = None) -> None:
    """Send kvpolicy's spans and metrics to these providers instead of the global ones (None: global)."""
    global _tracer_provider, _meter_provider, _tracer, _instruments
    _tracer_provider, _meter_provider = tracer_provider, meter_provider
    _tracer, _instruments = None, None


def get_providers() -> tuple[trace.TracerProvider | None, metrics.MeterProvider | None]:
    """The providers set by :func:`set_providers` (None: the global one)."""
    return _tracer_provider, _meter_provider


def get_tracer() -> trace.Tracer:
    """kvpolicy's tracer (a proxy to the global provider until one is configured)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(INSTRUMENTATION, _version(), tracer_provider=_tracer_provider)
    return _tracer


def _version() -> str:
    """kvpolicy's version, reported as the instrumentation scope version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvpolicy")
    except PackageNotFoundError:
        return ""


class _Instruments:
    def __init__(self) -> None:
        meter = metrics.get_meter(INSTRUMENTATION, _version(), meter_provider=_meter_provider)
        self.dropped = meter.create_counter("kvpolicy.tokens_dropped", unit="{token}",
                                            description="cache entries dropped by compression")
        self.merged = meter.create_counter("kvpolicy.tokens_merged", unit="{token}",
                                           description="cache entries merged into kept entries")
        self.duration = meter.create_histogram("kvpolicy.compress.duration", unit="s",
                                               description="time spent compressing one layer",
                                               explicit_bucket_boundaries_advisory=DURATION_BUCKETS)


def _get_instruments() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


# --------------------------------------------------------------------------------------------- spans
@contextmanager
def generate_span(policy: str, report: Callable[[], Any] | None = None) -> Iterator[trace.Span]:
    """Parent span of every compression done while a :func:`kvpolicy.compress` block is open.

    ``report`` (e.g. ``cache.report``) is called when the block ends, only if the span is recorded; its
    per-layer rows become ``kvpolicy.report.<field>`` array attributes (see :func:`report_attributes`).
    """
    with get_tracer().start_as_current_span(GENERATE_SPAN, attributes={PREFIX + "policy": policy}) as span:
        try:
            yield span
        finally:
            if report is not None and span.is_recording():
                try:
                    span.set_attributes(report_attributes(report()))
                except Exception as exc:  # noqa: BLE001 - telemetry must not mask the block's own outcome
                    span.set_attribute(PREFIX + "report_error", repr(exc))


def report_attributes(report: Any) -> dict[str, Any]:
    """A :class:`~kvpolicy.cache.CacheReport` as span attributes: one array per
    :class:`~kvpolicy.cache.LayerReport` field, item ``i`` for the ``i``-th reported layer."""
    rows = report.as_dicts()
    out = {}
    for k in rows[0] if rows else ():
        v = attribute_value([r[k] for r in rows])
        if v is not None:
            out[REPORT_PREFIX + k] = v
    return out


def report_rows(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    """Inverse of :func:`report_attributes`: per-layer dicts from a ``kvpolicy.generate`` span's attributes."""
    cols = {k[len(REPORT_PREFIX):]: list(v) for k, v in attributes.items() if k.startswith(REPORT_PREFIX)}
    n = min((len(v) for v in cols.values()), default=0)
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


@contextmanager
def compress_span(event: CompressionEvent) -> Iterator[CompressionEvent]:
    """Time one compression; the body fills ``event``; the span gets its attributes at the end.

    An exception inside the body is recorded on the span (status ERROR, exception event), with the
    attributes known before it (not the :data:`RESULT_FIELDS`), and re-raised; no metric is recorded
    for a failed compression.
    """
    with get_tracer().start_as_current_span(COMPRESS_SPAN, record_exception=True,
                                            set_status_on_exception=True) as span:
        t0 = time.perf_counter()
        done = False
        try:
            yield event
            done = True
        finally:
            event.seconds = time.perf_counter() - t0
            if span.is_recording():
                attrs = event.attributes()
                if not done:  # keep only what was known before the failure
                    attrs = {k: v for k, v in attrs.items() if k[len(PREFIX):] not in RESULT_FIELDS}
                span.set_attributes(attrs)
    labels = {PREFIX + "policy": event.policy, PREFIX + "phase": event.phase}
    inst = _get_instruments()
    inst.dropped.add(event.tokens_dropped, labels)
    inst.merged.add(event.tokens_merged, labels)
    inst.duration.record(event.seconds, labels)


# --------------------------------------------------------------------------------------------- saved traces
class TraceFileError(KVPolicyError, ValueError):
    """A saved trace file is missing or is not a JSON-lines trace."""


def read_trace(path: str) -> list[dict[str, Any]]:
    """The span records of a JSON-lines trace written by ``--trace jsonl:PATH`` (other lines skipped)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise TraceFileError(f"trace file {str(p)!r} does not exist; write one with `kvpolicy run --trace jsonl:PATH`")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TraceFileError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a trace written "
                             f"by --trace jsonl:PATH") from None
    spans = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceFileError(f"{p}:{i}: not a JSON line ({exc.msg}); expected a trace written by "
                              f"--trace jsonl:PATH") from exc
        if isinstance(rec, dict) and rec.get("type") == "span":
            spans.append(rec)
    return spans


def trace_reports(spans: list[dict[str, Any]]) -> list[tuple[Any, list[dict[str, Any]]]]:
    """One ``(CacheReport, failed compress spans)`` per ``kvpolicy.generate`` span, in start order.

    The report comes from the span's ``kvpolicy.report.*`` arrays, i.e. exactly what ``cache.report()``
    printed. ``kvpolicy.compress`` spans without a generate span (or under one that carries no report)
    are aggregated per layer instead: seen = tokens in at the last event, kept / KV now = after the last
    event, merged and time summed, KV full = bytes before the first event (per row: divided by the batch).
    """
    from kvpolicy.cache import CacheReport, LayerReport

    gens = sorted((s for s in spans if s.get("name") == GENERATE_SPAN), key=lambda s: s["start_time_unix_nano"])
    comp = sorted((s for s in spans if s.get("name") == COMPRESS_SPAN), key=lambda s: s["start_time_unix_nano"])
    children: dict[str | None, list[dict[str, Any]]] = {}
    gen_ids = {g["span_id"] for g in gens}
    for s in comp:
        parent = s.get("parent_span_id")
        children.setdefault(parent if parent in gen_ids else None, []).append(s)
    groups = [(g["attributes"].get(PREFIX + "policy", "?"), g, children.get(g["span_id"], [])) for g in gens]
    if children.get(None):
        orphans = children[None]
        groups.append((orphans[0]["attributes"].get(PREFIX + "policy", "?"), None, orphans))
    out = []
    for policy, gen, evs in groups:
        failed = [s for s in evs if s.get("status", {}).get("code") == "ERROR"]
        rows = report_rows(gen["attributes"]) if gen is not None else []
        if rows:
            layers = [LayerReport(**{k: r.get(k, 0) for k in LayerReport.__dataclass_fields__}) for r in rows]
        else:
            layers = _layers_from_events([s["attributes"] for s in evs if s not in failed], LayerReport)
        out.append((CacheReport(policy=policy, layers=layers), failed))
    return out


def _layers_from_events(events: list[dict[str, Any]], row_type: Any) -> list[Any]:
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for a in events:
        by_layer.setdefault(int(a[PREFIX + "layer"]), []).append(a)
    rows = []
    for layer, evs in sorted(by_layer.items()):
        first, last = evs[0], evs[-1]
        b = max(1, int(last.get(PREFIX + "batch", 1)))
        rows.append(row_type(
            layer=layer, tokens_seen=int(last[PREFIX + "tokens_in"]) // b,
            entries=int(last[PREFIX + "tokens_kept"]) // b, tokens_kept=int(last[PREFIX + "tokens_kept"]) // b,
            tokens_merged=sum(int(e[PREFIX + "tokens_merged"]) for e in evs) // b,
            image_tokens_in=int(first[PREFIX + "image_tokens_in"]) // b,
            image_tokens_kept=int(last[PREFIX + "image_tokens_kept"]) // b,
            bytes_full=int(first[PREFIX + "bytes_before"]), bytes_now=int(last[PREFIX + "bytes_after"]),
            seconds=sum(float(e[PREFIX + "seconds"]) for e in evs), events=len(evs)))
    return rows


def render_trace_summary(path: str) -> str:
    """The per-layer table(s) of a saved JSON-lines trace, as ``kvpolicy run`` prints them."""
    reports = trace_reports(read_trace(path))
    if not reports:
        return f"{path}: no kvpolicy spans"
    parts = []
    for report, failed in reports:
        text = str(report)
        for s in failed:
            a = s["attributes"]
            text += (f"\nFAILED layer {a.get(PREFIX + 'layer')} ({a.get(PREFIX + 'phase')}): "
                     f"{s['status'].get('description') or 'error'}")
        parts.append(text)
    return "\n\n".join(parts)
