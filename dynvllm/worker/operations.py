"""Engine operations an operator runs on a worker: clear its prefix cache, put it to sleep, wake it.

All need the admin token when one is configured. A sleeping worker says so in its card, so
routers stop sending it requests until it wakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from dynvllm import protocol
from dynvllm.runtime.errors import BadRequest
from dynvllm.settings import Settings
from dynvllm.worker.adapters import check_admin


class EngineOperations:
    def __init__(self, engine: Any, settings: Settings, on_change: Callable[[], Awaitable[None]]) -> None:
        self.engine = engine
        self.settings = settings
        self.on_change = on_change
        self.sleeping = 0  # the sleep level, 0 when awake

    def handlers(self) -> dict[str, Callable]:
        return {protocol.CLEAR_KV: self.clear_kv, protocol.SLEEP: self.sleep, protocol.WAKE: self.wake}

    async def clear_kv(self, payload: Any = None) -> dict:
        check_admin(self.settings, payload)
        await self.engine.clear_kv()
        return {"status": "cleared"}

    async def sleep(self, payload: Any = None) -> dict:
        check_admin(self.settings, payload)
        level = payload.get("level", 1) if isinstance(payload, dict) else 1
        if level not in (1, 2):
            raise BadRequest("sleep level is 1 (offload weights) or 2 (discard weights)")
        if self.sleeping:
            return {"status": "already sleeping", "level": self.sleeping}
        self.sleeping = level  # out of routing first, so nothing new arrives while it goes to sleep
        await self.on_change()
        try:
            await self.engine.sleep(level)
        except BaseException:
            self.sleeping = 0
            await self.on_change()
            raise
        return {"status": "sleeping", "level": level}

    async def wake(self, payload: Any = None) -> dict:
        check_admin(self.settings, payload)
        if not self.sleeping:
            return {"status": "already awake"}
        await self.engine.wake()
        self.sleeping = 0
        await self.on_change()
        return {"status": "awake"}
