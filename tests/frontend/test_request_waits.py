"""The request path's waits and hooks: a known model's worker waited for, hooks told of refusals."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.request_path import RequestPath
from dynvllm.runtime.discovery import Watcher


def path_over(models: dict) -> RequestPath:
    registry = SimpleNamespace(models=models, watcher=Watcher(None, "ns"))
    path = RequestPath(registry, None, None, FrontendMetrics(), None)  # type: ignore[arg-type]
    path.worker_wait = 3.0
    return path


async def test_a_worker_is_waited_for_until_it_registers():
    models: dict = {}
    path = path_over(models)
    ready = lambda e: bool(e.instances)  # noqa: E731
    task = asyncio.create_task(path.wait_worker("m", ready))
    await asyncio.sleep(0.3)
    assert not task.done()
    models["m"] = ModelEntry("m", {}, {"w": SimpleNamespace(endpoints=["generate"], card={})})
    assert await asyncio.wait_for(task, 1) is models["m"]


async def test_no_wait_when_off_full_or_closing():
    path = path_over({})
    path.worker_wait = 0.2
    started = time.monotonic()
    assert await path.wait_worker("m", bool) is None
    assert 0.2 <= time.monotonic() - started < 1
    path.max_worker_waits = 0
    started = time.monotonic()
    assert await path.wait_worker("m", bool) is None
    assert time.monotonic() - started < 0.05  # too many wait already: at once
    path.max_worker_waits, path.worker_wait = 10, 30.0
    task = asyncio.create_task(path.wait_worker("m", bool))
    await asyncio.sleep(0.05)
    path.closing = True  # the frontend drains
    assert await asyncio.wait_for(task, 1) is None


async def test_a_refusal_by_a_hook_reaches_every_on_end_hook():
    path = path_over({})
    ended: list[tuple[str, bool]] = []

    async def refuse(r) -> None:
        raise RequestError(429, "over the limit")

    async def fine(r) -> None:
        r.notes["took"] = True

    path.on_admit += [fine, refuse]
    path.on_end.append(lambda r, status: ended.append((status, r.refused)))
    r = SimpleNamespace(dispatches=[SimpleNamespace()], notes={}, refused=False)
    with pytest.raises(RequestError):
        await path._run_admit_hooks(r)  # type: ignore[arg-type]
    assert ended == [("429", True)] and r.notes["took"]
    assert r.dispatches[0].wait_worker == path.wait_worker  # a dispatch may wait for a worker too


def test_only_a_model_some_worker_served_is_waited_for():
    """An alias of a model never served (a gateway's stale name) is a 404 at once, not a wait."""
    path = path_over({})
    reg = path.models
    reg.aliases = {"short": "tiny", "ghost": "nothing"}  # type: ignore[attr-defined]
    reg.adapter_sources = {"a1": ("tiny", "file:///a")}  # type: ignore[attr-defined]
    reg.seen = {"tiny"}  # type: ignore[attr-defined]
    reg.was_served = lambda m: m in reg.seen  # type: ignore[attr-defined]
    assert path._waitable("tiny") == "tiny"
    assert path._waitable("short") == "tiny"
    assert path._waitable("a1") == "tiny"
    assert path._waitable("ghost") is None
    assert path._waitable("never") is None
    path.worker_wait = 0
    assert path._waitable("tiny") is None
