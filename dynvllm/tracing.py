"""OpenTelemetry traces across processes: one trace per request, from the client's W3C
`traceparent` through the frontend's spans (the request, with admission, route and each stage
beneath it; the first token and the stream's end as events) to the workers' spans and vLLM's own
(`llm_request`).

Off unless `--otlp-traces-endpoint` is set; only then is OpenTelemetry imported (the `tracing`
extra). The context travels in the requests the frontend sends to workers (`trace`: W3C
headers, see `dynvllm.protocol`); a worker continues it and hands its own span's context to
vLLM as `trace_headers`. Spans are parented explicitly, never through a "current span", so
concurrent requests on one event loop never mix.

Spans are recorded as plain fields (`Span`) and handed to the SDK's span processor as its
`ReadableSpan` when they end: the SDK's own live span (a lock, bounded attribute maps, a context
object, the sampler at every child, a copy at its end) cost about as much per request as the
frontend's own work on it. Sampling (the SDK's sampler, `OTEL_TRACES_SAMPLER`), ids, the resource,
the batch processor and the OTLP exporter are the SDK's.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

#: The W3C headers a trace context travels in.
HEADERS = ("traceparent", "tracestate")
#: A W3C traceparent, as the OpenTelemetry propagator reads it.
_TRACEPARENT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
#: The exporter's wire protocol, as vLLM reads it (so one endpoint serves both).
PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


class TracingUnavailable(RuntimeError):
    """--otlp-traces-endpoint was given but OpenTelemetry is not installed."""


def epoch_ns(monotonic: float) -> int:
    """A `time.monotonic()` reading as the wall-clock nanoseconds spans carry."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


#: The batch processor's queue and export batch, unless OTEL_BSP_* set them: the SDK's 2,048 and
#: 512 fill in about two seconds at a few hundred requests a second (three spans each), and each
#: export is an HTTP request (with the `requests` library's per-request environment lookups).
BATCH_DEFAULTS = {"OTEL_BSP_MAX_QUEUE_SIZE": 16384, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 2048}


class Tracing:
    """This process's tracer, exporting to an OTLP endpoint."""

    def __init__(self, endpoint: str, service: str, processor: Any = None) -> None:
        """`processor`: where finished spans go instead of a batch to the endpoint (tests)."""
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError as exc:
            raise TracingUnavailable(
                f"--otlp-traces-endpoint needs OpenTelemetry: pip install 'dynvllm[tracing]' ({exc})"
            ) from None
        from opentelemetry import trace

        self._trace = trace
        self._readable, self._event = ReadableSpan, Event
        created = Resource.create({"service.name": service, "process.pid": os.getpid()})
        self.resource = _fixed(Resource)(created.attributes, created.schema_url)
        self.provider = TracerProvider(resource=self.resource)
        if processor is None:
            # The batch processor exports from a thread of its own: encoding and sending never run
            # on the event loop, though they share the interpreter with it.
            sizes = {k: _env_int(k, v) for k, v in BATCH_DEFAULTS.items()}
            processor = BatchSpanProcessor(
                _exporter(endpoint),
                max_queue_size=sizes["OTEL_BSP_MAX_QUEUE_SIZE"],
                max_export_batch_size=min(
                    sizes["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"], sizes["OTEL_BSP_MAX_QUEUE_SIZE"]
                ),
            )
        self.provider.add_span_processor(processor)  # flushed and stopped with the provider
        self._processor = processor
        sdk_tracer: Any = self.provider.get_tracer("dynvllm")  # the SDK's: its sampler and ids
        self._sampler, self._ids = sdk_tracer.sampler, sdk_tracer.id_generator
        self._scope = InstrumentationScope("dynvllm")
        self._kinds = (trace.SpanKind.INTERNAL, trace.SpanKind.SERVER)
        self._state = trace.TraceState

    def extract(self, headers: Mapping[str, str] | None) -> Any:
        """The context a carrier (HTTP headers, a request's `trace` map) continues, or None: what
        the W3C propagator extracts, read here without its generic carrier handling (a copy of
        the headers, a regex lookup, a context per call), which cost as much as the root span."""
        header = headers.get("traceparent") if headers else None
        if not header or len(header) > 512:
            return None
        match = _TRACEPARENT.match(header)
        if match is None:
            return None
        version, trace_id, span_id, flags, rest = match.groups()
        if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        t = self._trace
        state = headers.get("tracestate") if headers else None
        context = t.SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            True,
            t.TraceFlags(int(flags, 16)),
            self._state.from_header([state]) if state and len(state) <= 512 else None,
        )
        return t.set_span_in_context(t.NonRecordingSpan(context))

    def start(
        self,
        name: str,
        parent: Any = None,
        start: float | None = None,
        server: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ) -> Any:
        """A span under `parent` (a `Span`, a context from `extract`, or None for a root);
        `start` is a `time.monotonic()` reading when the span began earlier than now; `server`
        marks the span that serves a call from another process. A span under a `Span` takes its
        parent's sampling decision; a root asks the sampler."""
        attributes = {k: v for k, v in attrs.items() if v is not None} if attrs else {}
        kind = self._kinds[server]
        if isinstance(parent, Span):
            child = Span(
                self, name, parent.trace_id, parent.context(), parent.recording, kind, start, attributes
            )
            child.trace_state = parent.trace_state
            return child
        remote = self._trace.get_current_span(parent).get_span_context() if parent is not None else None
        if remote is not None and remote.is_valid:
            trace_id = remote.trace_id
        else:
            remote, trace_id = None, self._ids.generate_trace_id()
        decision = self._sampler.should_sample(parent, trace_id, name, kind, attributes).decision
        span = Span(self, name, trace_id, remote, decision.is_sampled(), kind, start, attributes)
        if remote is not None and remote.trace_state:
            span.trace_state = remote.trace_state
        return span

    def carrier(self, span: Span) -> dict[str, str]:
        """W3C headers naming `span` as the parent of what the receiver does."""
        # Written directly: the propagator builds a context and checks it first, at several times
        # the cost, for the same header.
        out = {
            "traceparent": f"00-{span.trace_id:032x}-{span.span_id:016x}-{'01' if span.recording else '00'}"
        }
        if span.trace_state:
            out["tracestate"] = span.trace_state.to_header()
        return out

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is queued


class Span:
    """A span being recorded: plain fields until it ends, then one `ReadableSpan` for the span
    processor (nothing at all when it is not sampled)."""

    __slots__ = (
        "_context",
        "_ended",
        "attributes",
        "events",
        "kind",
        "name",
        "parent",
        "recording",
        "span_id",
        "start_ns",
        "trace_id",
        "trace_state",
        "tracing",
    )  # fmt: skip

    def __init__(
        self,
        tracing: Tracing,
        name: str,
        trace_id: int,
        parent: Any,
        recording: bool,
        kind: Any,
        start: float | None,
        attributes: dict[str, Any],
    ) -> None:
        self.tracing, self.name, self.trace_id, self.parent = tracing, name, trace_id, parent
        self.span_id = tracing._ids.generate_span_id()
        self.recording, self.kind, self.attributes = recording, kind, attributes
        self.start_ns = time.time_ns() if start is None else epoch_ns(start)
        self.events: list[tuple[str, Any, int]] = []
        self.trace_state: Any = None
        self._context: Any = None
        self._ended = False

    def is_recording(self) -> bool:
        return self.recording

    def context(self) -> Any:
        """This span's SDK `SpanContext` (the parent its children name)."""
        if self._context is None:
            t = self.tracing._trace
            flags = t.TraceFlags(t.TraceFlags.SAMPLED if self.recording else t.TraceFlags.DEFAULT)
            self._context = t.SpanContext(self.trace_id, self.span_id, False, flags, self.trace_state)
        return self._context

    def get_span_context(self) -> Any:
        return self.context()

    def set_attribute(self, key: str, value: Any) -> None:
        if value is not None:  # as the SDK: an attribute without a value is left out
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update((k, v) for k, v in attributes.items() if v is not None)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        self.events.append((name, attributes, time.time_ns()))

    def end(self) -> None:
        if not self.recording or self._ended:
            return
        self._ended = True
        t = self.tracing
        event = t._event
        t._processor.on_end(
            t._readable(
                self.name,
                self.context(),
                self.parent,
                t.resource,
                self.attributes,
                [event(name, attrs, ns) for name, attrs, ns in self.events],
                kind=self.kind,
                start_time=self.start_ns,
                end_time=time.time_ns(),
                instrumentation_scope=t._scope,
            )
        )


def _env_int(name: str, default: int) -> int:
    """A positive integer from the environment; anything else is the default (as the SDK reads
    its variables: a bad value is not a reason to stop)."""
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


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


def _exporter(endpoint: str) -> Any:
    """The SDK's OTLP exporter of the configured protocol, encoding with `otlp_wire`."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from dynvllm.otlp_wire import SpanEncoder

    encode = SpanEncoder(lambda spans: encode_spans(spans).SerializeToString())
    protocol = os.environ.get(PROTOCOL_ENV, "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        class GrpcExporter(OTLPSpanExporter):
            def _translate_data(self, data: Any) -> Any:
                # Parsing the bytes back is done in C: a fraction of the SDK's encoding.
                return ExportTraceServiceRequest.FromString(encode(data))

        return GrpcExporter(endpoint=endpoint, insecure=not endpoint.startswith("https"))
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http
        from opentelemetry.sdk.trace.export import SpanExportResult

        class HttpExporter(Http):
            """Sends the bytes through the exporter's client (retries, timeouts, compression);
            an SDK without that client, a batch over the size limit or after shutdown goes the
            exporter's own way."""

            def export(self, spans: Any) -> Any:
                client, metrics = getattr(self, "_client", None), getattr(self, "_metrics", None)
                if client is None or metrics is None or getattr(self, "_shutdown", True):
                    return super().export(spans)
                data = encode(spans)
                if 0 < getattr(self, "_max_request_size", 0) < len(data):
                    return super().export(spans)
                with metrics.export_operation(len(spans)) as result:
                    sent = client.export(data)
                    if not sent.success:
                        result.error = sent.error
                        return SpanExportResult.FAILURE
                return SpanExportResult.SUCCESS

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

    def span(self, name: str, **attrs: Any) -> _Timed:
        self.opened()
        return _Timed(self.tracing.start(name, self.root, attrs=attrs))

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


class _Timed:
    """A span for the time of a `with` block; the error that left it named on it."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None:
            self.span.set_attribute("error", kind.__name__)
        self.span.end()


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
