"""A malformed event is dropped without breaking the subscriber, and counted and logged."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from dynvllm.runtime.events import LOAD, EventBus, LoadMetrics


class _Nats:
    def __init__(self) -> None:
        self.cb = None

    async def subscribe(self, subject, cb):
        self.cb = cb


def test_malformed_events_are_counted_and_logged(caplog):
    nc, got = _Nats(), []
    bus = EventBus(nc, "ns")

    async def run() -> None:
        await bus.subscribe(LOAD, got.append)
        subject = LOAD.subject("ns")
        await nc.cb(SimpleNamespace(subject=subject, data=b"\xc1 not msgpack"))
        await nc.cb(SimpleNamespace(subject=subject, data=LOAD.encode(LoadMetrics("w", running=2))))
        await nc.cb(SimpleNamespace(subject=subject, data=b"\x93\x01\x02\x03"))  # a list, not a dict

    with caplog.at_level(logging.WARNING, logger="dynvllm.events"):
        asyncio.run(run())
    assert [m.running for m in got] == [2]
    assert bus.dropped == {"ns.events.load": 2}
    assert "dropped a malformed event on ns.events.load (1 so far)" in caplog.text


def test_an_event_its_subscriber_refuses_is_dropped_and_the_next_one_applies(caplog):
    """E.g. a KV batch with a key the router's compiled table refuses (not a 64-bit int)."""
    nc, got = _Nats(), []
    bus = EventBus(nc, "ns")

    def apply(metrics: LoadMetrics) -> None:
        if metrics.running < 0:
            raise OverflowError("a block key is a 64-bit int")
        got.append(metrics.running)

    async def run() -> None:
        await bus.subscribe(LOAD, apply)
        subject = LOAD.subject("ns")
        for running in (1, -1, 3):
            await nc.cb(SimpleNamespace(subject=subject, data=LOAD.encode(LoadMetrics("w", running=running))))

    with caplog.at_level(logging.WARNING, logger="dynvllm.events"):
        asyncio.run(run())
    assert got == [1, 3]
    assert bus.dropped == {"ns.events.load": 1}
    assert "OverflowError: a block key is a 64-bit int" in caplog.text
