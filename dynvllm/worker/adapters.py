"""LoRA adapters on one worker: load, unload, list, with one lock per adapter name.

A second load of a name waits for the first and then reports it as already loaded (one
download). Capacity is the engine's `max_loras`. Unloading lets requests already using the
adapter finish. Every change is published in the worker's model card, so routers see at once
which worker holds which adapter.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from dynvllm import protocol
from dynvllm.models.adapter_sources import SourceError, resolve
from dynvllm.runtime.errors import BadRequest
from dynvllm.settings import Settings

log = logging.getLogger("dynvllm.worker.lora")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class Forbidden(BadRequest):
    kind = "Forbidden"


def check_admin(settings: Settings, payload: Any) -> None:
    """State-changing calls carry the admin token when one is configured."""
    token = settings.runtime.admin_token
    if token is None:
        return
    given = payload.get("admin_token") if isinstance(payload, dict) else None
    if not isinstance(given, str) or not hmac.compare_digest(given, token.get_secret_value()):
        raise Forbidden("this operation needs the admin token (DYN_ADMIN_TOKEN / --admin-token)")


class AdapterManager:
    def __init__(self, engine: Any, settings: Settings, on_change: Callable[[], Awaitable[None]]) -> None:
        self.engine = engine
        self.settings = settings
        self.on_change = on_change
        self.loaded: dict[str, dict[str, Any]] = {}
        #: Every adapter this worker has loaded, unloaded ones included: name -> source. Published
        #: in the card, so a frontend started later can load it again on demand.
        self.known: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def handlers(self) -> dict[str, Callable]:
        return {
            protocol.LORA_LOAD: self.load,
            protocol.LORA_UNLOAD: self.unload,
            protocol.LORA_LIST: self.list,
        }

    @staticmethod
    def _name(payload: Any) -> str:
        name = payload.get("name") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest(
                "an adapter name is 1-128 letters, digits and . _ : / - (starting with a letter or digit)"
            )
        return name

    async def load(self, payload: Any) -> dict:
        check_admin(self.settings, payload)
        name = self._name(payload)
        source = payload.get("source")
        if not isinstance(source, str) or not source:
            raise BadRequest("loading an adapter needs a source (a folder, file://, hf://org/repo, s3://...)")
        async with self._locks[name]:
            if name in self.loaded:
                return {"name": name, "status": "already loaded", "source": self.loaded[name]["source"]}
            capacity = self.engine.adapter_capacity()
            if capacity <= 0:
                raise BadRequest(
                    "this worker serves no adapters: start it with --enable-lora (and --max-loras N)"
                )
            if len(self.loaded) >= capacity:
                held = ", ".join(sorted(self.loaded))
                raise BadRequest(
                    f"this worker holds {capacity} adapters, its max_loras ({held}); unload one first"
                )
            w = self.settings.worker
            t0 = time.monotonic()
            try:
                path = await asyncio.to_thread(
                    resolve, source, w.lora_root_list(), w.lora_scheme_list(), w.lora_cache_dir or ""
                )
            except SourceError as exc:
                raise BadRequest(str(exc)) from None
            await self.engine.load_adapter(name, str(path))
            self.loaded[name] = {"source": source, "path": str(path), "loaded_at": time.time()}
            self.known[name] = source
            seconds = time.monotonic() - t0
        log.warning("adapter %s loaded from %s in %.2f s", name, source, seconds)
        await self.on_change()
        return {"name": name, "status": "loaded", "source": source, "seconds": round(seconds, 3)}

    async def unload(self, payload: Any) -> dict:
        check_admin(self.settings, payload)
        name = self._name(payload)
        async with self._locks[name]:
            if name not in self.loaded:
                raise BadRequest(
                    f"adapter {name!r} is not loaded on this worker (loaded: {sorted(self.loaded)})"
                )
            await self.engine.unload_adapter(name)  # waits for requests that use it
            del self.loaded[name]
        await self.on_change()
        return {"name": name, "status": "unloaded"}

    async def list(self, payload: Any = None) -> list[dict]:
        return [{"name": n, **info} for n, info in sorted(self.loaded.items())]
