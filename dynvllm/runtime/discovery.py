"""Discovery over NATS: instances announce themselves with heartbeats under a lease.

Subjects under the namespace: `instances.hb` (an instance's full record, every heartbeat),
`instances.bye` (graceful deregistration) and `instances.query` (a new watcher asks everyone to
announce now). A watcher forgets an instance whose heartbeats stop for `lease_ttl` seconds, so a
`kill -9` is noticed within lease_ttl plus one sweep; a NATS restart needs nothing special: the
client reconnects and the next heartbeat re-registers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

log = logging.getLogger("dynvllm.discovery")


@dataclass
class Instance:
    id: str
    component: str
    role: str = ""
    host: str = ""
    port: int = 0
    endpoints: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    started: float = 0.0

    @classmethod
    def new(cls, component: str, **kw: Any) -> Instance:
        return cls(id=secrets.token_hex(6), component=component, pid=os.getpid(), started=time.time(), **kw)

    def to_wire(self) -> bytes:
        return msgpack.packb(asdict(self))

    @classmethod
    def from_wire(cls, data: bytes) -> Instance:
        obj = msgpack.unpackb(data, raw=False)
        if not isinstance(obj, dict) or "id" not in obj or "component" not in obj:
            raise ValueError("not an instance record")
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)


def _subject(namespace: str, what: str) -> str:
    return f"{namespace}.instances.{what}"


class Lease:
    """Keeps one instance registered while the process lives.

    With `connect` (a coroutine function opening a NATS connection of its own) the heartbeats
    go out from a thread with its own event loop: a process whose loop is busy for seconds (an
    engine stepping through a thousand streams on a starved CPU) stays registered. The loop
    still marks itself alive at every beat, and the thread stops beating once the loop has not
    done so for `tolerate` seconds: a process whose loop hangs for good still loses its lease.
    """

    def __init__(
        self,
        nc: Any,
        namespace: str,
        instance: Instance,
        interval: float = 0.5,
        connect: Callable[[], Awaitable[Any]] | None = None,
        tolerate: float = 10.0,
    ) -> None:
        self.nc, self.namespace, self.instance, self.interval = nc, namespace, instance, interval
        self.connect, self.tolerate = connect, tolerate
        self._task: asyncio.Task | None = None
        self._sub: Any = None
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        #: The record the thread sends (bytes: replaced whole, read whole) and when the loop last ran.
        self._wire = b""
        self._alive = time.monotonic()

    async def start(self) -> None:
        async def on_query(msg: Any) -> None:
            await self.announce()

        self._sub = await self.nc.subscribe(_subject(self.namespace, "query"), cb=on_query)
        await self.announce()
        self._task = asyncio.create_task(self._beat())
        if self.connect is not None:
            self._thread = threading.Thread(target=self._beat_apart, name="lease", daemon=True)
            self._thread.start()

    async def announce(self) -> None:
        self._wire = self.instance.to_wire()
        try:
            await self.nc.publish(_subject(self.namespace, "hb"), self._wire)
        except Exception as exc:  # disconnected: the client buffers or the next beat retries
            log.debug("heartbeat of %s not sent: %s", self.instance.id, exc)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._alive = time.monotonic()
            if self._thread is None:
                await self.announce()
            else:
                self._wire = self.instance.to_wire()

    def _beat_apart(self) -> None:
        async def beat() -> None:
            assert self.connect is not None
            nc = await self.connect()
            subject = _subject(self.namespace, "hb")
            try:
                while not self._halt.is_set():
                    if time.monotonic() - self._alive < self.tolerate:
                        await nc.publish(subject, self._wire)
                    await asyncio.sleep(self.interval)
            finally:
                await nc.close()

        try:
            asyncio.run(beat())
        except Exception as exc:  # the loop's own beats go on (the lease may then lapse under load)
            log.warning("heartbeat thread of %s stopped: %s", self.instance.id, exc)

    async def stop(self) -> None:
        """Deregister now: watchers drop the instance without waiting for the lease."""
        if self._thread is not None:
            # Stopped before the goodbye, so that no beat from it re-registers the instance.
            self._halt.set()
            await asyncio.to_thread(self._thread.join, 2 * self.interval + 1)
            self._thread = None
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sub is not None:
            await _unsubscribe(self._sub)
        try:
            await self.nc.publish(_subject(self.namespace, "bye"), self.instance.id.encode())
            await self.nc.flush(timeout=1)
        except Exception as exc:  # watchers then see the lease expire instead
            log.warning("could not announce that %s leaves: %s", self.instance.id, exc)


Callback = Callable[[Instance], Any]


async def _unsubscribe(sub: Any) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # the connection is already closed: nothing left to undo
        log.debug("unsubscribe failed: %s", exc)


class Watcher:
    """Live view of the instances in a namespace, with add/remove callbacks."""

    def __init__(self, nc: Any, namespace: str, lease_ttl: float = 2.0) -> None:
        self.nc, self.namespace, self.lease_ttl = nc, namespace, lease_ttl
        self._seen: dict[str, tuple[Instance, float]] = {}
        self.on_add: list[Callback] = []
        self.on_remove: list[Callback] = []
        self.on_update: list[Callback] = []
        # Lease expiry only (not a graceful bye): the instance may be unreachable, not merely leaving.
        self.on_expire: list[Callback] = []
        self._subs: list[Any] = []
        self._sweeper: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Future] = set()

    async def start(self) -> None:
        self._subs.append(await self.nc.subscribe(_subject(self.namespace, "hb"), cb=self._on_hb))
        self._subs.append(await self.nc.subscribe(_subject(self.namespace, "bye"), cb=self._on_bye))
        await self.nc.publish(_subject(self.namespace, "query"), b"")
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for sub in self._subs:
            await _unsubscribe(sub)

    def instances(self, component: str | None = None, role: str | None = None) -> list[Instance]:
        out = [i for i, _ in self._seen.values()]
        if component:
            out = [i for i in out if i.component == component]
        if role:
            out = [i for i in out if i.role == role]
        return out

    def get(self, instance_id: str) -> Instance | None:
        entry = self._seen.get(instance_id)
        return entry[0] if entry else None

    async def wait_for(self, predicate: Callable[[Watcher], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))
            except TimeoutError:
                pass
        return True

    def _fire(self, callbacks: list[Callback], inst: Instance) -> None:
        """Run callbacks; one that fails is logged with its traceback and the others still run."""
        self._changed.set()
        for cb in callbacks:
            try:
                res = cb(inst)
                if asyncio.iscoroutine(res):
                    task = asyncio.ensure_future(res)
                    self._tasks.add(task)
                    task.add_done_callback(self._callback_done)
            except Exception:
                log.exception("discovery callback %r failed for instance %s", cb, inst.id)

    def _callback_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("discovery callback failed", exc_info=task.exception())

    async def _on_hb(self, msg: Any) -> None:
        try:
            inst = Instance.from_wire(msg.data)
        except Exception as exc:  # a stray or malformed message must not break discovery
            log.debug("ignoring a malformed heartbeat: %s", exc)
            return
        prev = self._seen.get(inst.id)
        self._seen[inst.id] = (inst, time.monotonic())
        if prev is None:
            self._fire(self.on_add, inst)
        elif prev[0] != inst:
            self._fire(self.on_update, inst)

    async def _on_bye(self, msg: Any) -> None:
        entry = self._seen.pop(msg.data.decode(errors="replace"), None)
        if entry:
            self._fire(self.on_remove, entry[0])

    async def _sweep(self) -> None:
        blind = False
        step = min(0.25, self.lease_ttl / 4)
        last = time.monotonic()
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            late, last = now - last - step, now
            if late > step:
                # This loop stood still (a CPU-starved host): heartbeats may be waiting unread in
                # its queue, and the time it lost says nothing about the instances.
                self._seen = {iid: (inst, min(now, seen + late)) for iid, (inst, seen) in self._seen.items()}
            if not getattr(self.nc, "is_connected", True):
                # Our link to NATS is down: missing heartbeats say nothing about the instances
                # (their streams still work), so no lease expires until we hear again.
                blind = True
                continue
            if blind:
                blind = False
                self._seen = {iid: (inst, now) for iid, (inst, _) in self._seen.items()}
                try:
                    await self.nc.publish(_subject(self.namespace, "query"), b"")
                except Exception as exc:  # flapping again: heartbeats will still come
                    log.debug("discovery query not sent: %s", exc)
                continue
            for iid, (inst, seen) in list(self._seen.items()):
                if now - seen > self.lease_ttl:
                    self._seen.pop(iid, None)
                    self._fire(self.on_remove, inst)
                    self._fire(self.on_expire, inst)
