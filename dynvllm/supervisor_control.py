"""The control endpoint of a `serve` supervisor: NATS requests that scale a role's workers.

Subject `NS.supervisor.control`, msgpack maps in and out:

    {"op": "scale", "role": "agg", "count": 2, "drain": [pid, ...]}   start or drain to 2 workers
    {"op": "workers"}                                                   {role: [pid, ...]} and draining

A scale-down drains: the chosen workers get SIGTERM, deregister at once, finish their in-flight
requests and exit; `serve` does not restart them. `drain` names the pids to drain first (the
planner's choice); the youngest go otherwise. With --admin-token set, requests must carry it.

The supervisor's loop is synchronous, so requests cross into it through a queue: the NATS side
(a thread with its own event loop) waits for the loop's answer on a future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dynvllm.settings import RuntimeSettings

log = logging.getLogger("dynvllm.serve")


def subject(namespace: str) -> str:
    return f"{namespace}.supervisor.control"


class ControlError(ValueError):
    """A request the supervisor refuses; the message goes back to the caller."""


@dataclass(frozen=True)
class ScaleRequest:
    role: str
    count: int
    drain: tuple[int, ...] = ()


@dataclass(frozen=True)
class WorkersRequest:
    pass


def parse(payload: Any, admin_token: str | None) -> ScaleRequest | WorkersRequest:
    """A request from its wire form; ControlError says what is wrong."""
    if not isinstance(payload, dict):
        raise ControlError("a control request is a map with an 'op'")
    given = str(payload.get("admin_token") or "")
    if admin_token is not None and not hmac.compare_digest(given, admin_token):
        raise ControlError("unauthorized: this service requires its --admin-token")
    op = payload.get("op")
    if op == "workers":
        return WorkersRequest()
    if op == "scale":
        role, count = payload.get("role"), payload.get("count")
        if not isinstance(role, str) or not role:
            raise ControlError("scale needs a 'role'")
        if not isinstance(count, int) or not 0 <= count <= 256:
            raise ControlError(f"scale needs a 'count' between 0 and 256 (got {count!r})")
        drain = payload.get("drain") or []
        if not isinstance(drain, list) or not all(isinstance(p, int) for p in drain):
            raise ControlError("'drain' is a list of worker pids")
        return ScaleRequest(role, count, tuple(drain))
    raise ControlError(f"unknown op {op!r}: scale or workers")


@dataclass
class ControlServer:
    """Answers control requests from a thread; `pending()` hands them to the supervisor's loop."""

    rt: RuntimeSettings
    inbox: queue.Queue = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="serve-control", daemon=True)
        self._thread.start()
        ready.wait(10)

    def pending(self) -> list[tuple[Any, concurrent.futures.Future]]:
        out = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except Exception:  # the service still runs; only scaling from outside is lost
            log.exception("the supervisor's control endpoint stopped")
        finally:
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        from dynvllm.runtime import nats as natsrt

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        nc = await natsrt.connect(self.rt, name="dynvllm-serve-control", give_up_after=10)
        token = self.rt.admin_token.get_secret_value() if self.rt.admin_token else None

        async def on_request(msg: Any) -> None:
            try:
                request = parse(msgpack.unpackb(msg.data, raw=False), token)
                future: concurrent.futures.Future = concurrent.futures.Future()
                self.inbox.put((request, future))
                answer = await asyncio.wait_for(asyncio.wrap_future(future), 10)
            except (ControlError, ValueError, msgpack.UnpackException) as exc:
                answer = {"error": str(exc)}
            except TimeoutError:
                answer = {"error": "the supervisor did not answer within 10 s"}
            if msg.reply:
                await msg.respond(msgpack.packb(answer))

        # A queue group: were two `serve` processes to share a namespace, one request would still
        # be carried out once, not by each of them.
        await nc.subscribe(subject(self.rt.namespace), queue="supervisors", cb=on_request)
        await nc.flush()
        ready.set()
        await self._stop.wait()
        await natsrt.close(nc)
