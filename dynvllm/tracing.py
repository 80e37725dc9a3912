"""OpenTelemetry traces across processes: one trace per request, from the client's W3C
`traceparent` through the frontend's spans (the request, with admission, route and each stage
beneath it; the first token and the stream's end as events) to the workers' spans and vLLM's own
(`llm_request`).

Off unless `--otlp-traces-endpoint` is set; only then is OpenTelemetry imported (the `tracing`
extra). The context travels in the requests the frontend sends to workers (`trace`: W3C
headers, see `dynvllm.protocol`); a worker continues it and hands its own span's context to
vLLM as `trace_headers`. Spans are parented explicitly, never through a "current span", so
concurrent requests on one event loop never mix.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

#: The W3C headers a trace context travels in.
HEADERS = ("traceparent", "tracestate")
#: The exporter's wire protocol, as vLLM reads it (so one endpoint serves both).
PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


class TracingUnavailable(RuntimeError):
    """--otlp-traces-endpoint was given but OpenTelemetry is not installed."""


def epoch_ns(monotonic: float) -> int:
    """A `time.monotonic()` reading as the wall-clock nanoseconds spans carry."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class Tracing:
    """This process's tracer, exporting to an OTLP endpoint."""

    def __init__(self, endpoint: str, service: str, processor: Any = None) -> None:
        """`processor`: where finished spans go instead of a batch to the endpoint (tests)."""
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise TracingUnavailable(
                f"--otlp-traces-endpoint needs OpenTelemetry: pip install 'dynvllm[tracing]' ({exc})"
            ) from None
        from opentelemetry import trace

        self._trace = trace
        created = Resource.create({"service.name": service, "process.pid": os.getpid()})
        self.provider = TracerProvider(resource=_fixed(Resource)(created.attributes, created.schema_url))
        # The batch processor exports from a thread of its own: encoding and sending never run on
        # the event loop, though they share the interpreter with it.
        self.provider.add_span_processor(processor or BatchSpanProcessor(_exporter(endpoint)))
        self.tracer = self.provider.get_tracer("dynvllm")
        self._propagator = TraceContextTextMapPropagator()

    def extract(self, headers: Mapping[str, str] | None) -> Any:
        """The context a carrier (HTTP headers, a request's `trace` map) continues, or None."""
        if not headers or "traceparent" not in headers:
            return None
        return self._propagator.extract(dict(headers))

    def start(
        self,
        name: str,
        parent: Any = None,
        start: float | None = None,
        server: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ) -> Any:
        """A span under `parent` (a span, a context, or None for a root); `start` is a
        `time.monotonic()` reading when the span began earlier than now; `server` marks the span
        that serves a call from another process."""
        ctx = self._trace.set_span_in_context(parent) if _is_span(parent) else parent
        kind = self._trace.SpanKind.SERVER if server else self._trace.SpanKind.INTERNAL
        return self.tracer.start_span(
            name,
            context=ctx,
            kind=kind,
            start_time=epoch_ns(start) if start is not None else None,
            attributes={k: v for k, v in (attrs or {}).items() if v is not None},
        )

    def carrier(self, span: Any) -> dict[str, str]:
        """W3C headers naming `span` as the parent of what the receiver does."""
        # Written directly: the propagator builds a context and checks it first, at several times
        # the cost, for the same header.
        c = span.get_span_context()
        if not c.is_valid:
            return {}
        out = {"traceparent": f"00-{c.trace_id:032x}-{c.span_id:016x}-{c.trace_flags:02x}"}
        if c.trace_state:
            out["tracestate"] = c.trace_state.to_header()
        return out

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is queued


def _fixed(base: type) -> type:
    """A Resource whose hash is computed once. The exporter groups every span by its resource,
    and the SDK's hash serializes the resource's attributes to JSON each time: that made up half
    of the cost of exporting a span."""

    class FixedResource(base):
        _hash: int | None = None

        def __hash__(self) -> int:
            if self._hash is None:
                self._hash = super().__hash__()
            return self._hash

    return FixedResource


def _is_span(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "get_span_context")


def _exporter(endpoint: str) -> Any:
    protocol = os.environ.get(PROTOCOL_ENV, "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https"))
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint)
    raise TracingUnavailable(f"{PROTOCOL_ENV}={protocol!r}: dynvllm exports grpc or http/protobuf")


def check_available() -> None:
    """TracingUnavailable unless the SDK and the exporter of the configured protocol import
    (checked before processes start, without importing them)."""
    import importlib.util

    protocol = os.environ.get(PROTOCOL_ENV, "grpc")
    exporter = {"grpc": "grpc", "http/protobuf": "http"}.get(protocol)
    if exporter is None:
        raise TracingUnavailable(f"{PROTOCOL_ENV}={protocol!r}: dynvllm exports grpc or http/protobuf")
    for module in ("opentelemetry.sdk.trace", f"opentelemetry.exporter.otlp.proto.{exporter}.trace_exporter"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise TracingUnavailable(f"--otlp-traces-endpoint needs {module}: pip install 'dynvllm[tracing]'")


def setup(endpoint: str | None, service: str) -> Tracing | None:
    """This process's tracing, or None when no endpoint is set (nothing is imported then)."""
    return Tracing(endpoint, service) if endpoint else None


def check_trace(value: Any) -> dict[str, str] | None:
    """A wire request's `trace` map, checked (None if absent); ValueError says what is wrong."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or set(value) - set(HEADERS)
        or not all(isinstance(v, str) and len(v) <= 512 for v in value.values())
    ):
        raise ValueError("trace must be a map of W3C headers (traceparent, tracestate) to strings")
    return value


class RequestTrace:
    """The spans of one request in the frontend: a root (continuing the client's trace), with
    admission, route and each stage beneath it; the first token and the stream's end are events on
    the root. The generate call on a worker is a child of the root: the worker's own span covers
    it, so the frontend makes none of its own for it (every span costs its creation and its export,
    tens of microseconds each, in the frontend's one process)."""

    def __init__(self, tracing: Tracing, root: Any) -> None:
        self.tracing, self.root = tracing, root
        self.admission: Any = None

    def opened(self) -> None:
        """Work on workers begins: the admission span (queues, quotas) ends here."""
        if self.admission is not None:
            self.admission.end()
            self.admission = None

    @contextlib.contextmanager
    def span(self, name: str, **attrs: Any) -> Iterator[Any]:
        self.opened()
        span = self.tracing.start(name, self.root, attrs=attrs)
        try:
            yield span
        except BaseException as exc:
            span.set_attribute("error", type(exc).__name__)
            raise
        finally:
            span.end()

    def carrier(self, span: Any) -> dict[str, str]:
        if isinstance(span, Hop):
            span = self.root
        return self.tracing.carrier(span)

    def generate(self, worker: str | None) -> Hop:
        """The stream from a worker: its calls carry the root's context."""
        return Hop(self, worker)

    @staticmethod
    def first_token(hop: Any) -> None:
        """Marks the first token: an event on the root (or on the span given)."""
        if isinstance(hop, Hop):
            hop.trace.root.add_event("first token", {"dynvllm.worker": hop.worker or ""})
        else:
            hop.add_event("first token")

    def end(self, status: str, **attrs: Any) -> None:
        self.opened()
        attrs["http.status_code"] = int(status) if status.isdigit() else 0
        self.root.set_attributes(attrs)
        self.root.add_event("stream end")
        self.root.end()


class Hop:
    """One generate stream of a request, on one worker (a request that migrates has several)."""

    __slots__ = ("trace", "worker")

    def __init__(self, trace: RequestTrace, worker: str | None) -> None:
        self.trace, self.worker = trace, worker

    def end(self) -> None:
        """Nothing to end: the stream is no span of its own (see `RequestTrace`)."""


def span(trace: RequestTrace | None, name: str, **attrs: Any) -> contextlib.AbstractContextManager[Any]:
    """`trace.span(...)`, or nothing when the request is not traced."""
    return trace.span(name, **attrs) if trace is not None else contextlib.nullcontext()


def traced_handler(tracing: Tracing, endpoint: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A worker endpoint that continues the caller's trace: a span for the call, whose context
    replaces the request's `trace` (so the engine's spans, vLLM's, sit beneath it)."""

    def call(payload: Any) -> Any:
        parent = tracing.extract(payload.get("trace")) if isinstance(payload, dict) else None
        if parent is None:
            return handler(payload)
        work = tracing.start(
            f"worker {endpoint}",
            parent,
            server=True,
            attrs={"dynvllm.request_id": payload.get("request_id"), "dynvllm.endpoint": endpoint},
        )
        result = handler({**payload, "trace": tracing.carrier(work)})
        if inspect.isawaitable(result):
            return _ended_after(result, work)
        return _ended_stream(result, work)

    return call


async def _ended_after(result: Any, span: Any) -> Any:
    try:
        return await result
    finally:
        span.end()


async def _ended_stream(stream: AsyncIterator[Any], span: Any) -> AsyncIterator[Any]:
    first = True
    try:
        async for item in stream:
            if first:
                span.add_event("first token")
                first = False
            yield item
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        span.end()
