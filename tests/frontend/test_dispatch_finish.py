"""A worker lost after a request's final delta: the request is complete, not migrated (pure:
the worker stream and the router are stand-ins; the real path is tests/e2e/test_multihost.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from dynvllm import protocol
from dynvllm.frontend.dispatch import Dispatch
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry
from dynvllm.router.policies import Pick
from dynvllm.runtime.errors import InstanceLost


class Worker:
    """A generate stream that sends `deltas`, then loses its connection before the end frame."""

    def __init__(self, deltas: list[dict]) -> None:
        self.deltas, self.calls = deltas, []

    def call(self, endpoint: str, payload: dict):
        self.calls.append(payload)

        async def frames():
            for d in self.deltas:
                yield d
            raise InstanceLost("connection dropped")

        return frames()


class Router:
    settings = SimpleNamespace(migration_limit=3)

    def choose(self, candidates, prompt, block_size, lora, images=None, image_rule=None):
        return Pick(candidates[0])

    def started(self, *args) -> None: ...
    def finished(self, *args) -> None: ...
    def grow(self, *args) -> None: ...


def _dispatch(worker: Worker, max_tokens: int) -> Dispatch:
    entry = ModelEntry("m", {"block_size": 4})
    entry.instances = {
        w: SimpleNamespace(id=w, host="h", port=1, endpoints={protocol.GENERATE}, card={}) for w in ("a", "b")
    }
    pool = SimpleNamespace(get=lambda *a: asyncio.sleep(0, worker), drop=lambda i: None)
    return Dispatch(pool, Router(), entry, [1, 2, 3], {"max_tokens": max_tokens, "n": 1}, FrontendMetrics())


async def _collect(d: Dispatch) -> list[dict]:
    return [x async for x in d.stream()]


def test_a_worker_lost_after_the_final_delta_ends_the_request():
    """Stopped at EOS after 3 of 10 tokens, then the connection drops before the end frame: going
    on elsewhere would generate past the model's own stop."""
    w = Worker([protocol.delta(0, [7, 8]), protocol.delta(0, [2], "stop")])
    out = asyncio.run(_collect(_dispatch(w, 10)))
    assert [d["finish_reason"] for d in out] == [None, "stop"]
    assert len(w.calls) == 1


def test_a_worker_lost_mid_stream_migrates_with_the_rest_of_the_budget():
    first, second = Worker([protocol.delta(0, [7, 8])]), Worker([protocol.delta(0, [9], "stop")])
    d = _dispatch(first, 10)
    workers = iter([first, second])
    d.pool = SimpleNamespace(get=lambda *a: asyncio.sleep(0, next(workers)), drop=lambda i: None)
    out = asyncio.run(_collect(d))
    assert [x["token_ids"] for x in out] == [[7, 8], [9]]
    assert second.calls[0]["token_ids"] == [1, 2, 3, 7, 8]
    assert second.calls[0]["sampling"]["max_tokens"] == 8
