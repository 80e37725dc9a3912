"""State-changing calls the frontend fans out to workers (LoRA load/unload), guarded by the
admin token when one is configured (`X-Admin-Token` header; workers check it again)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dynvllm import protocol
from dynvllm.frontend.bodies import json_object
from dynvllm.frontend.errors import RequestError as APIError
from dynvllm.frontend.models import ModelRegistry
from dynvllm.runtime.errors import RemoteError
from dynvllm.runtime.streams import StreamClientPool, unary

LORA_LOAD, LORA_UNLOAD = protocol.LORA_LOAD, protocol.LORA_UNLOAD
log = logging.getLogger("dynvllm.frontend")


def _err(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, param=param, code=code).body(), status_code=status)


class AdminCalls:
    def __init__(self, models: ModelRegistry, pool: StreamClientPool, token: str | None) -> None:
        self.models, self.pool, self.token = models, pool, token

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("x-admin-token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def lora(self, request: Request, body: bytes, load: bool) -> Response:
        if not self._authorized(request):
            return _err(
                401, "this route needs the admin token: send X-Admin-Token", code="invalid_admin_token"
            )
        try:
            data = json_object(body)
        except APIError as exc:
            return _err(exc.status, exc.message)
        if not isinstance(data.get("lora_name"), str):
            return _err(400, "lora_name is required", param="lora_name")
        name = data["lora_name"]
        if load and not isinstance(data.get("lora_path"), str):
            return _err(400, "lora_path is required", param="lora_path")
        targets = self._workers(data.get("model"), name, load)
        if not targets:
            what = "no worker holds it" if not load else "no worker serves the base model"
            return _err(404, f"adapter {name!r}: {what}", param="lora_name", code="model_not_found")
        payload: dict[str, Any] = {"name": name, "admin_token": self.token}
        if load:
            payload["source"] = data["lora_path"]
        endpoint = LORA_LOAD if load else LORA_UNLOAD
        results = await asyncio.gather(*(call_worker(self.pool, inst, endpoint, payload) for inst in targets))
        failed = {iid: r for iid, r in results if isinstance(r, str)}
        if failed:
            detail = "; ".join(f"{iid}: {msg}" for iid, msg in sorted(failed.items()))
            return _err(
                400, f"adapter {name!r} failed on {len(failed)} of {len(results)} worker(s): {detail}"
            )
        verb = "added" if load else "removed"
        return JSONResponse(
            {"status": f"Success: LoRA adapter '{name}' {verb} successfully.", "workers": dict(results)}
        )

    async def clear_kv(self, request: Request, forget: Any) -> Response:
        """Clear every worker's prefix cache; the router's index forgets the workers that cleared."""
        if not self._authorized(request):
            return _err(
                401, "this route needs the admin token: send X-Admin-Token", code="invalid_admin_token"
            )
        workers = [
            inst
            for e in self.models.models.values()
            for inst in e.instances.values()
            if protocol.CLEAR_KV in inst.endpoints
        ]
        payload = {"admin_token": self.token}
        results = await asyncio.gather(
            *(call_worker(self.pool, i, protocol.CLEAR_KV, payload) for i in workers)
        )
        cleared = sorted(iid for iid, r in results if not isinstance(r, str))
        for iid in cleared:
            forget(iid)
        failed = {iid: r for iid, r in results if isinstance(r, str)}
        return JSONResponse({"cleared": cleared, "failed": failed}, status_code=200 if not failed else 500)

    def _workers(self, model: Any, name: str, load: bool) -> list[Any]:
        if not load:
            held = self.models.adapters().get(name)
            if held is None:
                return []
            entry, ids = held
            return [entry.instances[i] for i in ids if i in entry.instances]
        entries = list(self.models.models.values())
        if isinstance(model, str):
            entries = [e for e in entries if e.name == model]
        elif len(entries) > 1:
            return []  # several base models: the request must name one
        return [inst for e in entries for inst in e.instances.values() if LORA_LOAD in inst.endpoints]


async def call_worker(pool: StreamClientPool, inst: Any, endpoint: str, payload: dict) -> tuple[str, Any]:
    """(worker id, result), or (worker id, error message) when the worker refused or failed."""
    try:
        conn = await pool.get(inst.id, inst.host, inst.port)
        return inst.id, await unary(conn, endpoint, payload, timeout=600)
    except RemoteError as exc:
        return inst.id, exc.message
    except TimeoutError:
        return inst.id, "timed out"


class OnDemandAdapters:
    """--lora-on-demand: load a known adapter that no live worker holds on the least-loaded worker
    with room, evicting that worker's least recently used adapter when every worker is full."""

    def __init__(self, models: ModelRegistry, pool: StreamClientPool, load: Any, token: str | None) -> None:
        self.models, self.pool, self.load, self.token = models, pool, load, token
        self.last_used: dict[tuple[str, str], float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def used(self, worker: str, adapter: str) -> None:
        import time

        self.last_used[(worker, adapter)] = time.monotonic()

    async def ensure(self, name: str) -> bool:
        """True once some live worker holds the adapter; False if it is unknown or cannot load."""
        if name in self.models.adapters():
            return True
        known = self.models.adapter_sources.get(name)
        if known is None:
            return False  # never seen on any worker: a plain 404
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.models.adapters():
                return True
            base, source = known
            entry = self.models.models.get(base)
            if entry is None:
                return False
            workers = [i for i in entry.instances.values() if LORA_LOAD in i.endpoints]
            if not workers:
                return False
            target, victim = self._place(workers)
            payload: dict[str, Any] = {"admin_token": self.token}
            if victim is not None:
                await call_worker(self.pool, target, LORA_UNLOAD, {**payload, "name": victim})
            log.warning("loading adapter %s on demand on worker %s (evicting %s)", name, target.id, victim)
            _, result = await call_worker(
                self.pool, target, LORA_LOAD, {**payload, "name": name, "source": source}
            )
            if isinstance(result, str):
                log.warning("on-demand load of adapter %s on %s failed: %s", name, target.id, result)
                return False
            for _ in range(100):  # the worker re-announces its card at once
                if name in self.models.adapters():
                    return True
                await asyncio.sleep(0.05)
            return False

    def _place(self, workers: list[Any]) -> tuple[Any, str | None]:
        load = self.load

        def room(w: Any) -> int:
            return int(w.card.get("lora_capacity") or 0) - len(w.card.get("loras") or ())

        with_room = [w for w in workers if room(w) > 0]
        if with_room:
            return min(with_room, key=lambda w: (load.get(w.id, 0.0), w.id)), None
        target = min(
            (w for w in workers if w.card.get("lora_capacity")), key=lambda w: (load.get(w.id, 0.0), w.id)
        )
        victim = min(target.card.get("loras") or [], key=lambda a: self.last_used.get((target.id, a), 0.0))
        return target, victim
