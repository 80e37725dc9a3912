"""Tracing's pure parts: the wire `trace` field is checked, a worker call continues its caller's
trace, and nothing of OpenTelemetry is imported while tracing is off."""

from __future__ import annotations

import asyncio
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


def test_a_request_makes_three_frontend_spans_and_its_worker_calls_carry_the_root():
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
    hop = trace.generate("w1")
    carried = trace.carrier(hop)
    # The same header the W3C propagator writes, for the root span.
    expected: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(expected, context=t._trace.set_span_in_context(root))
    assert carried == expected and carried["traceparent"].endswith(
        f"{root.get_span_context().span_id:016x}-01"
    )
    trace.first_token(hop)
    hop.end()  # no span of its own: nothing ends
    trace.end("200", **{"dynvllm.completion_tokens": 3})
    done = {s.name: s for s in spans.get_finished_spans()}
    assert sorted(done) == ["admission", "dynvllm.request", "route"]
    top = done["dynvllm.request"]
    assert [e.name for e in top.events] == ["first token", "stream end"]
    assert top.events[0].attributes["dynvllm.worker"] == "w1"
    assert top.attributes["http.status_code"] == 200 and top.attributes["dynvllm.completion_tokens"] == 3
    assert all(done[n].parent.span_id == top.context.span_id for n in ("admission", "route"))
    # The resource's hash is computed once (the exporter hashes it for every span).
    assert hash(top.resource) == hash(top.resource) and top.resource._hash is not None
    t.shutdown()
