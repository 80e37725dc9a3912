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
