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
