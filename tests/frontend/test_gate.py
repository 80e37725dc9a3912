"""The admission gate over fake workers: who waits, who goes next, and the 503s."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from dynvllm.frontend.admission_load import Thresholds
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.gate import AdmissionGate, request_priority
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry
from dynvllm.runtime.events import LoadMetrics


def worker(id: str = "", **card) -> SimpleNamespace:
    return SimpleNamespace(id=id, endpoints=["generate"], card=card)


def setup(limit=1, size=10, timeout=5.0, workers=1, thresholds=None, **card):
    entry = ModelEntry("m", {}, {f"w{i}": worker(f"w{i}", **card) for i in range(workers)})
    models = SimpleNamespace(models={"m": entry})
    gate = AdmissionGate(models, FrontendMetrics(), limit, size, timeout, thresholds)  # type: ignore[arg-type]
    return gate, entry


def request(entry, name="", priority=None, tenant="", headers=None):
    return SimpleNamespace(
        name=name,
        entry=entry,
        dispatch=SimpleNamespace(terminal="generate"),
        dispatches=[SimpleNamespace(priority=0, blocks=2.0)],
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


def load(worker: str, running: int, waiting: int, used: int = 0, total: int = 100) -> LoadMetrics:
    return LoadMetrics(worker, running, waiting, used, total, time.time())


async def test_requests_wait_while_every_worker_reports_saturation_and_flow_when_one_frees():
    # Two workers of 2 sequences each, no in-flight cap: the workers' reports decide.
    gate, entry = setup(limit=0, workers=2, thresholds=Thresholds(max_waiting=1), max_num_seqs=2)
    for w in ("w0", "w1"):
        gate.report(load(w, 0, 0))
    rs = [request(entry, str(i)) for i in range(10)]
    tasks = [asyncio.create_task(gate.enter(r)) for r in rs]
    await asyncio.sleep(0.01)
    # Room for 2 x (2 running + 1 waiting): let through at once, before any report shows them.
    assert sum(t.done() for t in tasks) == 6 and gate.waiting == 4
    # The workers report them: w0 full with one waiting, w1 full. Still no room.
    gate.report(load("w0", 2, 1))
    gate.report(load("w1", 2, 1))
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 6
    # One ends: its place is free before the next report says so.
    gate.leave(rs[0], "200")
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 7
    # A report that shows fewer held than this frontend has out (on their way, or ended unseen)
    # lets nothing more through; their ends, once seen, do.
    gate.report(load("w1", 1, 0))
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 7
    gate.leave(rs[1], "200")
    gate.leave(rs[2], "200")
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 9
    # KV use over its threshold saturates a worker however short its queue.
    gate.thresholds = Thresholds(max_waiting=1, max_kv_use=0.5)
    gate.report(load("w1", 0, 0, used=90))
    gate.report(load("w0", 0, 0, used=60))
    for r in rs[3:9]:
        gate.leave(r, "200")
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 9 and gate.waiting == 1
    gate.report(load("w0", 0, 0, used=10))
    await asyncio.gather(*tasks)
    # A report from a worker the frontend does not know changes nothing.
    gate.report(load("elsewhere", 0, 0))
    assert "elsewhere" not in gate.reports


async def test_a_worker_that_has_not_reported_counts_as_idle_and_the_cap_still_bounds():
    gate, entry = setup(limit=0, workers=1, thresholds=Thresholds(max_waiting=1), max_num_seqs=2)
    rs = [request(entry, str(i)) for i in range(6)]
    tasks = [asyncio.create_task(gate.enter(r)) for r in rs]
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 3  # its batch and one waiting, before any report
    gate.leave(rs[0], "200")
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 4  # what ends gives room back
    for r in rs[1:4]:
        gate.leave(r, "200")
    await asyncio.gather(*tasks)
    # With both measures the tighter one holds: the in-flight cap here.
    gate, entry = setup(limit=2, workers=1, thresholds=Thresholds(max_waiting=0))
    rs = [request(entry, str(i)) for i in range(4)]
    tasks = [asyncio.create_task(gate.enter(r)) for r in rs]
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 1  # no batch size known: one, until it reports
    gate.report(load("w0", 1, 0))  # one more when nothing waits
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 2
    gate.report(load("w0", 0, 0))
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 2  # the in-flight cap of 2
    gate.leave(rs[0], "200")
    gate.leave(rs[1], "200")
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 3  # one on its way, which the report did not show
    gate.report(load("w0", 1, 0))
    await asyncio.gather(*tasks)


def test_the_priority_travels_to_the_worker_in_the_generate_request():
    from dynvllm import protocol
    from dynvllm.runtime.errors import BadRequest

    wire = protocol.generate_request("r", [1, 2], {}, priority=-3)
    assert protocol.parse_generate(wire).priority == -3
    assert protocol.parse_generate(protocol.generate_request("r", [1], {})).priority == 0
    with pytest.raises(BadRequest, match="priority must be an integer"):
        protocol.parse_generate({**wire, "priority": "high"})


async def test_a_waiter_cancelled_just_before_its_turn_takes_no_slot():
    gate, entry = setup(limit=1)
    first = request(entry)
    await gate.enter(first)
    gone = asyncio.create_task(gate.enter(request(entry)))
    await asyncio.sleep(0.01)
    gone.cancel()  # its future is cancelled now; the task runs its handler later
    gate.leave(first, "200")  # the pump meets the cancelled waiter first
    await asyncio.gather(gone, return_exceptions=True)
    assert gate.waiting == 0 and gate.inflight[("m", "generate")] == 0
    await asyncio.wait_for(gate.enter(request(entry)), 1)


def test_priority_headers_are_read_from_the_asgi_bytes_ours_first():
    from starlette.datastructures import Headers

    def sent(*pairs: tuple[str, str]) -> Headers:
        return Headers(raw=[(k.encode(), v.encode()) for k, v in pairs])

    entry = setup()[1]
    base = [("host", "x"), ("authorization", "Bearer k")]
    both = sent(*base, ("x-vllm-priority", "7"), ("x-dynvllm-priority", "-2"), ("x-dynvllm-priority", "9"))
    assert request_priority(request(entry, priority=3, headers=both)) == -2
    assert request_priority(request(entry, priority=3, headers=sent(*base, ("x-vllm-priority", "7")))) == 7
    assert request_priority(request(entry, priority=3, headers=sent(*base))) == 3
    with pytest.raises(RequestError) as info:
        request_priority(request(entry, headers=sent(("x-vllm-priority", "soon"))))
    assert info.value.param == "x-vllm-priority"
