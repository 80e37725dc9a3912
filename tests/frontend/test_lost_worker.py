"""When the frontend counts a worker as lost, and what a stream on an adapter does then (pure:
connections, worker streams and the router are stand-ins; the real paths are
tests/e2e/test_lora.py and tests/e2e/test_migration.py)."""

from __future__ import annotations

import asyncio
import re
import time
from types import SimpleNamespace

import pytest

from dynvllm import protocol
from dynvllm.frontend.dispatch import Dispatch
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry
from dynvllm.router.policies import Pick
from dynvllm.runtime.errors import InstanceLost
from dynvllm.runtime.streams import Connection, StreamClientPool


def _quiet_pool(silent_for: float) -> tuple[StreamClientPool, Connection]:
    """A pool holding a connection (never opened) to worker "w" that has been silent a while."""
    pool = StreamClientPool()
    conn = Connection("127.0.0.1", 1, "w")
    conn.heard = time.monotonic() - silent_for
    pool._conns["w"] = conn
    return pool, conn


async def test_a_worker_that_stalled_past_its_lease_keeps_its_streams():
    """A worker process that stopped for longer than its lease (a loaded 2-core host) is silent
    on both its lease and its streams when the expiry is noticed; it speaks again a moment
    later. The quiet before the expiry was noticed proves nothing: its streams are kept."""
    pool, conn = _quiet_pool(silent_for=1.0)
    back = False

    async def resumes() -> None:
        nonlocal back
        await asyncio.sleep(0.3)
        conn.heard = time.monotonic()  # its stream flows again
        await asyncio.sleep(0.3)
        back = True  # and its heartbeat comes

    resuming = asyncio.create_task(resumes())
    await pool.drop_when_silent("w", 0.5, back=lambda _: back)
    await resuming
    assert not conn.closed


async def test_a_worker_that_stays_silent_is_dropped_once_quiet_since_its_expiry():
    pool, conn = _quiet_pool(silent_for=1.0)
    stream = conn.call("generate", {})
    t0 = time.monotonic()
    await pool.drop_when_silent("w", 0.3, back=lambda _: False)
    assert 0.25 <= time.monotonic() - t0 < 1.0
    assert conn.closed
    with pytest.raises(InstanceLost) as err:
        await stream.__anext__()
    # It reports its whole silence, the stall before the expiry too.
    said = re.search(r"lease expired and nothing heard for (\d+\.\d)s", err.value.message)
    assert said and float(said.group(1)) >= 1.3


class Worker:
    """A generate stream that sends `deltas`, then fails with `lost` (None: ends normally)."""

    def __init__(self, deltas: list[dict], lost: str | None = None) -> None:
        self.deltas, self.lost, self.calls = deltas, lost, []

    def call(self, endpoint: str, payload: dict):
        self.calls.append(payload)

        async def frames():
            for d in self.deltas:
                yield d
            if self.lost:
                raise InstanceLost(self.lost)

        return frames()


class Router:
    settings = SimpleNamespace(migration_limit=3)

    def choose(self, candidates, prompt, block_size, lora, images=None, image_rule=None):
        return Pick(candidates[0])

    def started(self, *args) -> None: ...
    def finished(self, *args) -> None: ...
    def grow(self, *args) -> None: ...


def _dispatch(workers: dict[str, Worker], loras: dict[str, list[str]]) -> tuple[Dispatch, list[str]]:
    """A request for adapter a1 of model m; `loras`: the adapters each worker's card lists."""
    entry = ModelEntry("m", {"block_size": 4})
    entry.instances = {
        w: SimpleNamespace(id=w, host="h", port=1, endpoints={protocol.GENERATE}, card={"loras": held})
        for w, held in loras.items()
    }
    dropped: list[str] = []

    async def get(iid, host, port):
        return workers[iid]

    pool = SimpleNamespace(get=get, drop=lambda iid, *a: dropped.append(iid))
    sampling = {"max_tokens": 10, "n": 1}
    return Dispatch(pool, Router(), entry, [1, 2, 3], sampling, FrontendMetrics(), "a1"), dropped


async def _collect(d: Dispatch) -> list[dict]:
    return [x async for x in d.stream()]


async def test_a_stream_on_an_adapter_no_other_worker_holds_fails_naming_its_lost_worker():
    """Its only holder is lost mid-stream: the error says which worker went, why, and that no
    other worker holds the adapter; the pool's connection to that worker (which other requests
    may use by now) is left to the pool."""
    reason = "instance a lost: lease expired and nothing heard for 4.1s"
    a = Worker([protocol.delta(0, [7, 8])], lost=reason)
    d, dropped = _dispatch({"a": a, "b": Worker([])}, {"a": ["a1"], "b": []})
    with pytest.raises(InstanceLost) as err:
        await _collect(d)
    message = err.value.message
    assert "adapter 'a1'" in message and "worker a" in message and reason in message
    assert "no other live worker holds the adapter" in message
    assert dropped == []
    assert len(a.calls) == 1


async def test_a_stream_is_not_moved_when_its_holder_starts_unloading_the_adapter():
    """An unload lets the adapter's running streams finish: the card no longer listing it (or
    listing it until the unload ends) changes nothing for a stream already on that worker."""
    a = Worker([protocol.delta(0, [7, 8]), protocol.delta(0, [9], "length")])
    d, dropped = _dispatch({"a": a}, {"a": ["a1"]})
    deltas = d.stream()
    first = await deltas.__anext__()
    d.entry.instances["a"].card = {"loras": []}
    rest = [x async for x in deltas]
    assert [x["token_ids"] for x in [first, *rest]] == [[7, 8], [9]]
    assert len(a.calls) == 1 and dropped == []
