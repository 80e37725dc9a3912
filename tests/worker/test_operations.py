"""Operator calls on a worker's engine: admin token, sleep levels, and routing out before sleep."""

from __future__ import annotations

import pytest

from dynvllm import protocol
from dynvllm.runtime.errors import BadRequest
from dynvllm.settings import build_settings
from dynvllm.worker.operations import EngineOperations


class FakeEngine:
    def __init__(self, fail_sleep: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail_sleep = fail_sleep

    async def clear_kv(self) -> None:
        self.calls.append(("clear_kv",))

    async def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))
        if self.fail_sleep:
            raise RuntimeError("engine refused")

    async def wake(self) -> None:
        self.calls.append(("wake",))


def _ops(engine: FakeEngine, token: str | None = None) -> tuple[EngineOperations, list[int]]:
    """The operations, and the sleep level each announcement (card update) carried."""
    settings = build_settings({"runtime": {"admin_token": token}} if token else {})
    announced: list[int] = []

    async def on_change() -> None:
        announced.append(ops.sleeping)

    ops = EngineOperations(engine, settings, on_change)
    return ops, announced


def test_handlers_are_the_protocols_endpoints():
    ops, _ = _ops(FakeEngine())
    assert set(ops.handlers()) == {protocol.CLEAR_KV, protocol.SLEEP, protocol.WAKE}


async def test_without_a_token_configured_anyone_may_clear():
    engine = FakeEngine()
    ops, _ = _ops(engine)
    assert await ops.clear_kv() == {"status": "cleared"}
    assert engine.calls == [("clear_kv",)]


@pytest.mark.parametrize("payload", [None, {}, {"admin_token": "wrong"}, {"admin_token": 7}, "s3cret"])
async def test_with_a_token_every_operation_needs_it(payload):
    engine = FakeEngine()
    ops, _ = _ops(engine, token="s3cret")
    for call in (ops.clear_kv, ops.sleep, ops.wake):
        with pytest.raises(BadRequest, match="admin token") as refused:
            await call(payload)
        assert refused.value.kind == "Forbidden"
    assert engine.calls == []
    assert await ops.clear_kv({"admin_token": "s3cret"}) == {"status": "cleared"}


async def test_sleep_leaves_routing_first_then_wake_rejoins():
    engine = FakeEngine()
    ops, announced = _ops(engine)
    assert await ops.sleep({"level": 2}) == {"status": "sleeping", "level": 2}
    # The card said "sleeping" before the engine was put to sleep, so nothing new arrived.
    assert announced == [2] and engine.calls == [("sleep", 2)]
    assert await ops.sleep() == {"status": "already sleeping", "level": 2}
    assert engine.calls == [("sleep", 2)]
    assert await ops.wake() == {"status": "awake"}
    assert ops.sleeping == 0 and announced == [2, 0] and engine.calls[-1] == ("wake",)
    assert await ops.wake() == {"status": "already awake"}
    assert engine.calls == [("sleep", 2), ("wake",)]


async def test_sleep_defaults_to_level_one_and_refuses_others():
    engine = FakeEngine()
    ops, _ = _ops(engine)
    for level in (0, 3, "1"):
        with pytest.raises(BadRequest, match="sleep level is 1"):
            await ops.sleep({"level": level})
    assert engine.calls == [] and ops.sleeping == 0
    assert await ops.sleep() == {"status": "sleeping", "level": 1}


async def test_a_failed_sleep_puts_the_worker_back_in_routing():
    engine = FakeEngine(fail_sleep=True)
    ops, announced = _ops(engine)
    with pytest.raises(RuntimeError, match="engine refused"):
        await ops.sleep()
    assert ops.sleeping == 0 and announced == [1, 0]
