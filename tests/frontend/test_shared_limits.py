"""Tenants' limits divided between frontend processes over a real nats-server: a flood spread over
three processes stays within the stated bound, concurrency never goes over, a process that joins
starts with its share, and one that dies leaves its share to the others within a lease."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time

import pytest

from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.quota_shares import bound
from dynvllm.frontend.shared_limits import SharedLimits
from dynvllm.frontend.surface import Surface
from dynvllm.frontend.tenants import Limits, TenantSpec
from dynvllm.runtime import nats as natsrt
from dynvllm.settings import RuntimeSettings, Settings

INTERVAL = 0.05


async def process(url: str, namespace: str, specs: dict[str, TenantSpec], silence: float = 1.0):
    nc = await natsrt.connect(RuntimeSettings(nats_url=url))
    shared = SharedLimits(nc, namespace, Limits(specs, time.monotonic()), INTERVAL, silence)
    await shared.start()
    return nc, shared


async def flood(shared: SharedLimits, rate: float, seconds: float, hold: float, inflight: list[int]) -> int:
    """Requests of tenant "t" at `rate` per second for `seconds`, each held `hold` seconds once
    admitted; the count admitted. `inflight` tracks the service-wide count and its peak."""
    admitted, tickets, tasks = 0, itertools.count(), []

    async def held(ticket: int) -> None:
        await asyncio.sleep(hold)
        inflight[0] -= 1
        shared.limits.finish("t", ticket, 0, True, time.monotonic())

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ticket = next(tickets)
        if shared.limits.admit("t", ticket, "m", None, 1, time.monotonic()) is None:
            admitted += 1
            inflight[0] += 1
            inflight[1] = max(inflight[1], inflight[0])
            tasks.append(asyncio.create_task(held(ticket)))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return admitted


async def test_a_flood_over_three_processes_stays_within_the_bound(nats_url):
    ns = "q" + secrets.token_hex(4)
    spec = TenantSpec(keys=["k"], requests_per_second=20, max_concurrent=4)
    procs = [await process(nats_url, ns, {"t": spec}) for _ in range(3)]
    seconds = 2.0
    try:
        assert all(shared.peers() == 3 for _, shared in procs)
        spread = [0, 0]
        # Ten times the rate in all: 120/s on one process, 75/s on another, 5/s on the third.
        counts = await asyncio.gather(
            flood(procs[0][1], 120, seconds, 0.05, spread),
            flood(procs[1][1], 75, seconds, 0.05, spread),
            flood(procs[2][1], 5, seconds, 0.05, spread),
        )
        # Then all of it on one process: it gets (nearly) the whole rate, not a third.
        alone = [0, 0]
        one = await flood(procs[0][1], 200, seconds, 0.05, alone)
    finally:
        for nc, shared in procs:
            await shared.stop()
            await natsrt.close(nc)
    limit = bound(spec, 3, seconds)["requests"]
    print(
        f"spread: admitted {counts} = {sum(counts)}, bound {limit:.0f}, peak in flight {spread[1]}; "
        f"one process: {one}, peak in flight {alone[1]}"
    )
    assert 0.8 * 20 * seconds <= sum(counts) <= limit
    assert 0.8 * 20 * seconds <= one <= limit
    assert spread[1] <= 4 and alone[1] <= 4


async def test_a_joining_process_starts_with_its_share_and_a_dead_ones_share_comes_back(nats_url):
    ns = "q" + secrets.token_hex(4)
    spec = TenantSpec(keys=["k"], requests_per_second=10, max_concurrent=2)
    nc_a, a = await process(nats_url, ns, {"t": spec}, silence=0.5)
    nc_b, b = await process(nats_url, ns, {"t": spec}, silence=0.5)
    try:
        # b heard a before serving: both hold half, neither the whole.
        assert a.peers() == b.peers() == 2
        assert a.limits.states["t"].share.requests == b.limits.states["t"].share.requests == 0.5
        assert a.limits.states["t"].max_concurrent == b.limits.states["t"].max_concurrent == 1
        # b dies without a word (its loop stops, its connection drops).
        assert b._task is not None
        b._task.cancel()
        await nc_b.close()
        died = time.monotonic()
        while a.limits.states["t"].share.requests < 1.0:
            assert time.monotonic() - died < 0.5 + 4 * INTERVAL, a.reports
            await asyncio.sleep(0.01)
        took = time.monotonic() - died
        print(f"the survivor held the whole limits {took:.2f} s after the other died (lease 0.5 s)")
        assert took >= 0.5 - 3 * INTERVAL  # not before a lease of silence (from its last report)
        assert a.limits.states["t"].max_concurrent == 2 and a.peers() == 1
        # A process that stops says goodbye: the other takes the whole without a lease's wait.
        nc_c, c = await process(nats_url, ns, {"t": spec}, silence=0.5)
        assert a.limits.states["t"].share.requests == 0.5
        await c.stop()
        await natsrt.close(nc_c)
        # No lease to wait for; a share grows an interval after the division that grew it.
        await asyncio.sleep(2.5 * INTERVAL)
        assert a.limits.states["t"].share.requests == 1.0
    finally:
        await a.stop()
        await natsrt.close(nc_a)


async def test_a_request_short_of_a_slot_here_gets_one_freed_elsewhere(nats_url, tmp_path):
    """With a limit of 2 over 4 processes, two hold no slot at first; a request there waits for the
    next division rather than get a 429 while the tenant has free slots."""
    from dynvllm.frontend.metrics import FrontendMetrics
    from dynvllm.frontend.tenancy import Tenants
    from tests.frontend.test_tenancy import request

    ns = "q" + secrets.token_hex(4)
    spec = TenantSpec(keys=["k"], max_concurrent=2)
    procs = [await process(nats_url, ns, {"t": spec}) for _ in range(4)]
    try:
        slotless = next(s for _, s in procs if s.limits.states["t"].max_concurrent == 0)
        file = tmp_path / "tenants.yaml"
        file.write_text("tenants: {t: {keys: [k], max_concurrent: 2}}")
        tenants = Tenants(file, [Surface(None, Settings())], FrontendMetrics())  # type: ignore[arg-type]
        tenants.limits, tenants.shared = slotless.limits, slotless  # the hook over that process
        t0 = time.monotonic()
        r = request({"authorization": "Bearer k"})
        await tenants.admit(r)
        waited = time.monotonic() - t0
        print(f"a request short of a slot waited {waited * 1000:.0f} ms for one")
        assert waited < 3 * INTERVAL + 0.1
        assert slotless.limits.states["t"].inflight == 1 and r.notes["tenant"] == "t"
        tenants.end(r, "200")
        # With every slot of the tenant taken somewhere, the refusal comes after the wait.
        others = [s for _, s in procs if s is not slotless]
        for i, s in enumerate(others[:2]):
            while s.limits.admit("t", 100 + i, "m", None, 1, time.monotonic()) is not None:
                await asyncio.sleep(INTERVAL)
        await asyncio.sleep(3 * INTERVAL)
        with pytest.raises(RequestError) as info:
            await tenants.admit(request({"authorization": "Bearer k"}))
        assert info.value.status == 429 and "limit of 2 concurrent" in info.value.message
    finally:
        for nc, shared in procs:
            await shared.stop()
            await natsrt.close(nc)


def test_a_peer_is_not_counted_silent_while_this_process_stood_still():
    now = [10.0]
    shared = SharedLimits(None, "ns", Limits({}, 0.0), 0.1, 2.0, clock=lambda: now[0])
    shared.reports = {shared.id: (10.0, {}), "peer": (10.0, {})}
    # This loop woke 3 s late (CPU-starved): the peer's report may be queued here, unread.
    now[0] = 13.1
    shared._excuse(3.0)
    shared._expire()
    assert "peer" in shared.reports
    # Silence while this loop runs still counts.
    now[0] = 15.2
    shared._excuse(0.0)
    shared._expire()
    assert "peer" not in shared.reports
