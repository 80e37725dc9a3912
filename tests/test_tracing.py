"""Tracing's pure parts: the wire `trace` field is checked, a worker call continues its caller's
trace, and nothing of OpenTelemetry is imported while tracing is off."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys

import pytest

from dynvllm import protocol, tracing
from dynvllm.runtime.errors import BadRequest

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_generate_and_pool_requests_carry_a_checked_trace():
    req = protocol.parse_generate(protocol.generate_request("r", [1, 2], {}, trace={"traceparent": PARENT}))
    assert req.trace == {"traceparent": PARENT}
    assert protocol.parse_generate(protocol.generate_request("r", [1], {})).trace is None
    pool = protocol.parse_pool(
        {**protocol.pool_request("r", [1], {}), "trace": {"traceparent": PARENT}}, "embed"
    )
    assert pool.trace == {"traceparent": PARENT}
    for bad in ({"traceparent": 3}, {"baggage": "x"}, "00-abc", {"traceparent": "x" * 600}):
        with pytest.raises(BadRequest, match="trace must be a map of W3C headers"):
            protocol.parse_generate(protocol.generate_request("r", [1], {}, trace=bad))


def test_nothing_of_opentelemetry_is_imported_while_tracing_is_off():
    code = (
        "import sys\nfrom dynvllm import tracing, protocol\nfrom dynvllm.frontend import observe, dispatch\n"
        "assert tracing.setup(None, 'x') is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_worker_call_continues_the_callers_trace_and_hands_its_own_span_on():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    t = tracing.Tracing("unused", "test", SimpleSpanProcessor(spans))
    seen: list[dict] = []

    async def generate(payload: dict):
        seen.append(payload)
        yield {"token_ids": [1]}
        yield {"token_ids": [2], "finish_reason": "length"}

    async def run() -> list:
        handler = tracing.traced_handler(t, "generate", generate)
        return [d async for d in handler({"request_id": "r1", "trace": {"traceparent": PARENT}})]

    assert len(asyncio.run(run())) == 2
    (span,) = spans.get_finished_spans()
    assert span.name == "worker generate"
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert [e.name for e in span.events] == ["first token"]
    # The engine sees the worker span as the parent of what it does (vLLM's trace_headers).
    handed = seen[0]["trace"]["traceparent"]
    assert handed == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{format(span.context.span_id, '016x')}-01"
    t.shutdown()


def test_a_request_makes_three_frontend_spans_and_one_per_stage_and_worker_calls_carry_them():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    spans = InMemorySpanExporter()
    t = tracing.Tracing("unused", "test", SimpleSpanProcessor(spans))
    root = t.start("dynvllm.request", t.extract({"traceparent": PARENT}), server=True)
    trace = tracing.RequestTrace(t, root)
    trace.admission = t.start("admission", root)
    with trace.span("route", **{"dynvllm.endpoint": "generate"}):
        pass
    with trace.span("stage prefill") as stage:  # a stage's worker call continues the stage's span
        assert trace.carrier(stage)["traceparent"] == f"00-{stage.trace_id:032x}-{stage.span_id:016x}-01"
    hop = trace.generate("w1")
    carried = trace.carrier(hop)
    # The same header the W3C propagator writes, for the root span.
    expected: dict[str, str] = {}
    sdk_root = t._trace.NonRecordingSpan(root.get_span_context())
    TraceContextTextMapPropagator().inject(expected, context=t._trace.set_span_in_context(sdk_root))
    assert carried == expected and carried["traceparent"].endswith(
        f"{root.get_span_context().span_id:016x}-01"
    )
    trace.first_token(hop)
    hop.end()  # no span of its own: nothing ends
    trace.end("200", **{"dynvllm.completion_tokens": 3})
    done = {s.name: s for s in spans.get_finished_spans()}
    assert sorted(done) == ["admission", "dynvllm.request", "route", "stage prefill"]
    top = done["dynvllm.request"]
    assert [e.name for e in top.events] == ["first token", "stream end"]
    assert top.events[0].attributes["dynvllm.worker"] == "w1"
    assert top.attributes["http.status_code"] == 200 and top.attributes["dynvllm.completion_tokens"] == 3
    assert all(done[n].parent.span_id == top.context.span_id for n in ("admission", "route", "stage prefill"))
    # The resource's hash is computed once (the exporter hashes it for every span).
    assert hash(top.resource) == hash(top.resource) and top.resource._hash is not None
    t.shutdown()


def _project_spans(t: tracing.Tracing) -> None:
    """A frontend request (remote parent with a tracestate) and a worker call, attributes of
    every scalar type, events with and without attributes."""
    ctx = t.extract({"traceparent": PARENT, "tracestate": "vendor=x,other=y"})
    root = t.start("dynvllm.request", ctx, server=True, attrs={"s": "é", "i": -3, "f": 0.5, "b": False})
    trace = tracing.RequestTrace(t, root)
    trace.admission = t.start("admission", root)
    with trace.span("route", **{"dynvllm.endpoint": "generate", "big": 1 << 62}):
        pass
    trace.first_token(trace.generate("w1"))
    trace.end("200", **{"dynvllm.completion_tokens": 3})
    work = t.start("worker generate", None, server=True, attrs={"dynvllm.request_id": "r", "none": None})
    work.add_event("first token")
    work.end()


def test_spans_are_encoded_as_the_exporters_own_encoder_encodes_them(monkeypatch):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from dynvllm.otlp_wire import SpanEncoder

    spans = InMemorySpanExporter()
    t = tracing.Tracing("unused", "test", SimpleSpanProcessor(spans))
    _project_spans(t)
    done = list(spans.get_finished_spans())
    assert len(done) == 4
    fallbacks: list[int] = []

    def sdk(batch):
        fallbacks.append(len(batch))
        return encode_spans(batch).SerializeToString()

    # The client's tracestate goes on with every span of its trace.
    assert [s.context.trace_state.get("vendor") for s in done[:3]] == ["x", "x", "x"]
    encode = SpanEncoder(sdk)
    assert encode(done) == encode_spans(done).SerializeToString() and not fallbacks
    # A span it does not write (a list attribute) leaves the batch to the exporter's encoder.
    odd = ReadableSpan("odd", done[0].context, None, done[0].resource, {"l": [1, 2]},
                       instrumentation_scope=done[0].instrumentation_scope)  # fmt: skip
    assert ExportTraceServiceRequest.FromString(encode([*done, odd])) == encode_spans([*done, odd])
    assert fallbacks == [5]
    # The gRPC exporter gets the same message, parsed back from these bytes.
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None:
        monkeypatch.delenv(tracing.PROTOCOL_ENV, raising=False)  # the default: gRPC
        grpc = tracing._exporter("http://127.0.0.1:9")  # nothing is sent
        assert grpc._translate_data(done) == encode_spans(done)
        grpc.shutdown()
    t.shutdown()


def test_the_http_exporter_sends_the_spans_encoded_here(monkeypatch):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.exporter.otlp.proto.http import trace_exporter
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from tests.otlp_receiver import OtlpReceiver

    def refuse(spans):
        raise AssertionError("the SDK's encoder was used")

    monkeypatch.setattr(trace_exporter, "encode_spans", refuse)
    monkeypatch.setenv(tracing.PROTOCOL_ENV, "http/protobuf")
    receiver = OtlpReceiver()
    try:
        t = tracing.Tracing("unused", "test", SimpleSpanProcessor(tracing._exporter(receiver.url)))
        _project_spans(t)
        got = receiver.trace("4bf92f3577b34da6a3ce929d0e0e4736", 3, timeout=10)
        assert sorted(s.name for s in got) == ["admission", "dynvllm.request", "route"]
        root = next(s for s in got if s.name == "dynvllm.request")
        assert root.attributes == {
            "s": "é", "i": -3, "f": 0.5, "b": False, "dynvllm.completion_tokens": 3, "http.status_code": 200,
        }  # fmt: skip
        assert root.events == ("first token", "stream end") and root.parent_id == "00f067aa0ba902b7"
        t.shutdown()
    finally:
        receiver.close()


def test_a_traceparent_is_read_as_the_w3c_propagator_reads_it():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    t = tracing.Tracing("unused", "test", _null_processor())
    w3c = TraceContextTextMapPropagator()
    tid, sid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    for header in (
        f"00-{tid}-{sid}-01",
        f"00-{tid}-{sid}-00",
        f" 00-{tid}-{sid}-01 ",
        f"01-{tid}-{sid}-01-future",
        f"00-{tid}-{sid}-01-extra",
        f"ff-{tid}-{sid}-01",
        f"00-{'0' * 32}-{sid}-01",
        f"00-{tid}-{'0' * 16}-01",
        f"00-{tid.upper()}-{sid}-01",
        "00-abc",
        "",
    ):
        for state in (None, "vendor=x,other=y", "bad state", "x=" + "y" * 600):
            carrier = {"traceparent": header} | ({"tracestate": state} if state is not None else {})
            mine = t.extract(carrier)
            theirs = trace.get_current_span(w3c.extract(carrier)).get_span_context()
            if not theirs.is_valid:
                assert mine is None, (header, state)
            else:
                assert trace.get_current_span(mine).get_span_context() == theirs, (header, state)
                assert trace.get_current_span(mine).get_span_context().trace_state == theirs.trace_state
    assert t.extract(None) is None and t.extract({}) is None
    t.shutdown()


def _null_processor():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return SimpleSpanProcessor(InMemorySpanExporter())
