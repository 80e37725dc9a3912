"""The admission gate over fake workers: who waits, who goes next, and the 503s."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.gate import AdmissionGate, request_priority
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry


def worker(**card) -> SimpleNamespace:
    return SimpleNamespace(endpoints=["generate"], card=card)


def setup(limit=1, size=10, timeout=5.0, workers=1):
    entry = ModelEntry("m", {}, {f"w{i}": worker() for i in range(workers)})
    models = SimpleNamespace(models={"m": entry})
    return AdmissionGate(models, FrontendMetrics(), limit, size, timeout), entry  # type: ignore[arg-type]


def request(entry, name="", priority=None, tenant="", headers=None):
    return SimpleNamespace(
        name=name,
        entry=entry,
        dispatch=SimpleNamespace(terminal="generate"),
        dispatches=[SimpleNamespace(priority=0)],
        notes={"tenant": tenant},
        client=headers or {},
        arrived=time.monotonic(),
        priority=priority,
    )


async def test_waiters_go_by_priority_then_tenants_in_turn():
    gate, entry = setup(limit=1)
    first = request(entry, "first")
    await gate.enter(first)  # a free slot: in at once
    order: list[str] = []

    async def go(r):
        await gate.enter(r)
        order.append(r.name)

    waiting = [
        request(entry, "a-low", 5, "a"),
        request(entry, "a-low2", 5, "a"),
        request(entry, "b-low", 5, "b"),
        request(entry, "c-high", None, "c", {"x-dynvllm-priority": "-1"}),
        request(entry, "a-mid", 0, "a"),
    ]
    tasks = [asyncio.create_task(go(r)) for r in waiting]
    await asyncio.sleep(0.01)
    assert order == [] and gate.waiting == 5
    current = first
    for _ in waiting:
        gate.leave(current, "200")
        await asyncio.sleep(0.01)
        current = next(r for r in waiting if r.name == order[-1])
    assert order == ["c-high", "a-mid", "a-low", "b-low", "a-low2"]
    await asyncio.gather(*tasks)
    assert gate.waiting == 0 and gate.inflight[("m", "generate")] == 1


async def test_capacity_is_per_ready_worker_and_grows_when_one_appears():
    gate, entry = setup(limit=2, workers=1)
    rs = [request(entry, str(i)) for i in range(5)]
    tasks = [asyncio.create_task(gate.enter(r)) for r in rs]
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 2
    entry.instances["asleep"] = worker(sleeping=True)
    gate.changed()
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 2  # a sleeping worker takes nothing
    entry.instances["w9"] = worker()
    gate.changed()
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 4
    gate.leave(rs[0], "200")
    await asyncio.gather(*tasks)


async def test_timeout_full_and_closing_are_503s_with_retry_after():
    gate, entry = setup(limit=1, size=1, timeout=0.1)
    await gate.enter(request(entry))
    started = time.monotonic()
    with pytest.raises(RequestError) as info:
        await gate.enter(request(entry))
    assert 0.09 < time.monotonic() - started < 1.0
    assert info.value.status == 503 and "within 0.1 s" in info.value.message
    assert int(info.value.headers["retry-after"]) >= 1
    assert gate.waiting == 0 and len(gate.queues[("m", "generate")]) == 0
    gate.timeout = 5.0
    waiter = asyncio.create_task(gate.enter(request(entry)))
    await asyncio.sleep(0.01)
    with pytest.raises(RequestError) as info:
        await gate.enter(request(entry))  # one waits already: the queue (size 1) is full
    assert info.value.status == 503 and "full" in info.value.message
    gate.close()
    with pytest.raises(RequestError) as info:
        await waiter
    assert info.value.status == 503 and "shutting down" in info.value.message
    text = gate.refused.collect()[0].samples
    assert {(s.labels["reason"], s.value) for s in text if s.name.endswith("_total")} == {
        ("timeout", 1.0),
        ("full", 1.0),
        ("closing", 1.0),
    }


async def test_a_cancelled_waiter_leaves_the_queue_and_no_slot_is_lost():
    gate, entry = setup(limit=1)
    first = request(entry)
    await gate.enter(first)
    gone = asyncio.create_task(gate.enter(request(entry)))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert gate.waiting == 0
    gate.leave(first, "200")
    assert gate.inflight[("m", "generate")] == 0
    await asyncio.wait_for(gate.enter(request(entry)), 1)


async def test_no_limit_means_no_queue_and_a_bad_header_is_a_400():
    gate, entry = setup(limit=0, workers=0)
    for _ in range(50):
        await gate.enter(request(entry))
    assert gate.waiting == 0
    assert request_priority(request(entry, priority=3)) == 3
    assert request_priority(request(entry, priority=3, headers={"x-dynvllm-priority": "-2"})) == -2
    assert request_priority(request(entry, priority=3, headers={"x-vllm-priority": "7"})) == 7  # vLLM's
    # The engine gets it too (its scheduler orders by it under --scheduling-policy priority).
    r = request(entry, priority=4)
    await gate.enter(r)
    assert r.dispatches[0].priority == 4
    with pytest.raises(RequestError) as info:
        await gate.enter(request(entry, headers={"x-vllm-priority": str(2**40)}))
    assert info.value.status == 400 and "out of range" in info.value.message
    with pytest.raises(RequestError) as info:
        await gate.enter(request(entry, headers={"x-dynvllm-priority": "high"}))
    assert info.value.status == 400 and info.value.param == "x-dynvllm-priority"


def test_the_priority_travels_to_the_worker_in_the_generate_request():
    from dynvllm import protocol
    from dynvllm.runtime.errors import BadRequest

    wire = protocol.generate_request("r", [1, 2], {}, priority=-3)
    assert protocol.parse_generate(wire).priority == -3
    assert protocol.parse_generate(protocol.generate_request("r", [1], {})).priority == 0
    with pytest.raises(BadRequest, match="priority must be an integer"):
        protocol.parse_generate({**wire, "priority": "high"})
