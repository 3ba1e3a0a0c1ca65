"""Distributed traces: a W3C ``traceparent`` travels with every request through every hop.

Each hop runs inside ``Tracing.hop``: an OpenTelemetry span that is the child
of the incoming ``traceparent``; the ``traceparent`` it yields is what the hop
passes on, so one request can be followed across admission, classifier,
scheduler, executor and sites. Sampled spans go to the Kafka event log (topic
``din.v1.telemetry.spans``, always) and to an OTLP collector when
``DIN_OTLP_ENDPOINT`` is set. Sampling is parent-based: a client's sampled
``traceparent`` is always traced; a request without one starts a trace with
probability ``DIN_TRACE_SAMPLE_RATIO``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from din.shared.contracts.telemetry import SpanV1

TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()


def _span_event(span: ReadableSpan) -> SpanV1:
    context = span.get_span_context()
    parent = span.parent
    resource = span.resource.attributes
    return SpanV1(
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_span_id=f"{parent.span_id:016x}" if parent is not None else None,
        name=span.name,
        service=str(resource.get("service.name", "")),
        instance=str(resource.get("service.instance.id", "")),
        site=str(resource.get("din.site", "")),
        start_ms=span.start_time / 1e6,
        end_ms=(span.end_time or span.start_time) / 1e6,
        attributes={k: str(v) for k, v in (span.attributes or {}).items()},
    )


class EventLogSpanExporter(SpanExporter):
    """Hands finished spans to the service's Kafka event log (called on the event loop's thread)."""

    def __init__(self, emit: Callable[[SpanV1], None]) -> None:
        self._emit = emit

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self._emit(_span_event(span))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class Tracing:
    """One service instance's tracer."""

    def __init__(
        self,
        service: str,
        instance: str,
        site: str,
        *,
        sample_ratio: float,
        emit: Callable[[SpanV1], None] | None = None,
        otlp_endpoint: str | None = None,
    ) -> None:
        resource = Resource.create(
            {"service.name": f"din-{service}", "service.instance.id": instance, "din.site": site}
        )
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        if emit is not None:
            self._provider.add_span_processor(SimpleSpanProcessor(EventLogSpanExporter(emit)))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
        self._tracer = self._provider.get_tracer("din")

    @contextmanager
    def hop(self, name: str, traceparent: str | None, **attributes: str | int | float | bool) -> Iterator[
            tuple[Span, str | None]]:
        """A span for one hop, child of ``traceparent``; yields it and the ``traceparent`` to pass on."""
        parent = _PROPAGATOR.extract({TRACEPARENT: traceparent}) if traceparent else None
        with self._tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            yield span, carrier.get(TRACEPARENT, traceparent)

    def shutdown(self) -> None:
        self._provider.shutdown()
