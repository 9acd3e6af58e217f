"""OpenTelemetry instrumentation (API only: a no-op unless the application configures an SDK).

One ``kvpolicy.compress`` span per (layer, event), child of the ``kvpolicy.generate`` span that
:func:`kvpolicy.compress` opens. Attribute names are prefixed ``kvpolicy.``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from opentelemetry import metrics, trace

INSTRUMENTATION = "kvpolicy"


@dataclass
class CompressionEvent:
    """What one compression of one layer did; the cache's report and the spans share it."""

    layer: int
    phase: str  # "prefill" or "decode"
    policy: str
    scorer: str
    merger: str
    event: str = "compress"  # compress | compact | fixed-point
    tokens_in: int = 0
    tokens_kept: int = 0
    tokens_merged: int = 0
    tokens_dropped: int = 0
    image_tokens_in: int = 0
    image_tokens_kept: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)

    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if k == "figures":
                for fk, fv in v.items():
                    if isinstance(fv, (int, float, str, bool)):
                        out[f"kvpolicy.{fk}"] = fv
                    elif isinstance(fv, (list, tuple)) and all(isinstance(x, (int, float)) for x in fv):
                        out[f"kvpolicy.{fk}"] = list(fv)
            else:
                out[f"kvpolicy.{k}"] = v
        return out


def _tracer() -> trace.Tracer:
    return trace.get_tracer(INSTRUMENTATION)


class _Instruments:
    def __init__(self) -> None:
        meter = metrics.get_meter(INSTRUMENTATION)
        self.dropped = meter.create_counter("kvpolicy.tokens_dropped", unit="{token}",
                                            description="cache entries dropped by compression")
        self.merged = meter.create_counter("kvpolicy.tokens_merged", unit="{token}",
                                           description="cache entries merged into kept entries")
        self.duration = meter.create_histogram("kvpolicy.compress.duration", unit="s",
                                               description="time spent compressing one layer")


_instruments: _Instruments | None = None


def _get_instruments() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


@contextmanager
def generate_span(policy: str) -> Iterator[trace.Span]:
    """Parent span of every compression done while a :func:`kvpolicy.compress` block is open."""
    with _tracer().start_as_current_span("kvpolicy.generate", attributes={"kvpolicy.policy": policy}) as span:
        yield span


@contextmanager
def compress_span(event: CompressionEvent) -> Iterator[CompressionEvent]:
    """Time one compression; the body fills ``event``; the span gets its attributes at the end.

    An exception inside the body is recorded on the span and re-raised.
    """
    with _tracer().start_as_current_span("kvpolicy.compress", record_exception=True,
                                         set_status_on_exception=True) as span:
        t0 = time.perf_counter()
        try:
            yield event
        finally:
            event.seconds = time.perf_counter() - t0
            if span.is_recording():
                span.set_attributes(event.attributes())
    labels = {"kvpolicy.policy": event.policy, "kvpolicy.phase": event.phase}
    inst = _get_instruments()
    inst.dropped.add(event.tokens_dropped, labels)
    inst.merged.add(event.tokens_merged, labels)
    inst.duration.record(event.seconds, labels)
