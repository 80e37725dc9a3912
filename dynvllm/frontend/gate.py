"""The admission gate: requests wait in the frontend while a model's workers are saturated.

Saturated means either of (each where set):
- every ready worker of the model (those that end its chains, awake) reports an engine queue of
  `--admission-max-waiting` requests or its KV blocks `--admission-max-kv-use` full, counting what
  this frontend let through since their reports (`admission_load`);
- the requests this frontend has let through to a model and not yet seen end reach
  `--max-inflight-per-worker` times its ready workers.
The rest wait in a `FairQueue` (priority, then tenants in turn), at most `--admission-queue-size`
of them, each for at most `--admission-timeout` seconds from its arrival; then a 503 with
Retry-After. A request's priority is its `x-dynvllm-priority` header, else its body's `priority`
field where the API has one; lower goes first, as in vLLM.

The gate counts what it lets through itself as well as what workers report: a released request
reaches its worker's count only once its stream opens, and counting that late would let a burst
through.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram

from dynvllm.frontend.admission import FairQueue, free_slots
from dynvllm.frontend.admission_load import INF, Report, Room, Thresholds, room
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry, ModelRegistry
from dynvllm.frontend.request_path import Admitted
from dynvllm.runtime.discovery import Instance
from dynvllm.runtime.events import LOAD, EventBus, LoadMetrics

PRIORITY_HEADER = "x-dynvllm-priority"
#: vLLM's server reads its own header of the same meaning; clients written for it send this one.
VLLM_PRIORITY_HEADER = "x-vllm-priority"
_PRIORITY_HEADERS = (PRIORITY_HEADER, VLLM_PRIORITY_HEADER)
_RAW_PRIORITY_HEADERS = tuple(h.encode() for h in _PRIORITY_HEADERS)

Key = tuple[str, str]  # (model, terminal stage)


class _Ticket:
    __slots__ = ("fut", "priority", "r", "tenant")

    def __init__(self, r: Admitted, priority: int, tenant: str) -> None:
        self.r, self.priority, self.tenant = r, priority, tenant
        #: True: let through; False: the frontend closes; None: its time to wait ran out.
        self.fut: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()


def _expire(fut: asyncio.Future[bool | None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Free(NamedTuple):
    slots: float  # under the in-flight cap
    room: Room  # by the workers' reports

    @property
    def any(self) -> bool:
        return self.slots > 0 and self.room.any

    def less(self, weight: int, blocks: float) -> _Free:
        """What is left once a request of `weight` and `blocks` is let through."""
        return _Free(self.slots - weight, Room(self.room.requests - weight, self.room.blocks - blocks))


class _ModelMetrics(NamedTuple):
    queued: Any
    waited: Any


def ready(entry: ModelEntry | None, terminal: str) -> list[Instance]:
    """Workers of the model that end chains at `terminal` and are awake."""
    if entry is None:
        return []
    return [
        inst
        for inst in entry.instances.values()
        if terminal in inst.endpoints
        and inst.card.get("terminal", True) is not False
        and not inst.card.get("sleeping")
    ]


def ready_workers(entry: ModelEntry | None, terminal: str) -> int:
    return len(ready(entry, terminal))


def batch_size(inst: Instance) -> int | None:
    """Requests the worker's engines run at once (None: its card does not say)."""
    seqs = inst.card.get("max_num_seqs")
    return int(seqs) * int(inst.card.get("dp_size") or 1) if seqs else None


class AdmissionGate:
    def __init__(
        self,
        models: ModelRegistry,
        metrics: FrontendMetrics,
        limit_per_worker: int,
        queue_size: int,
        timeout: float,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.models, self.limit, self.size, self.timeout = models, limit_per_worker, queue_size, timeout
        self.thresholds = thresholds or Thresholds()
        #: Some measure of saturation is on: requests are counted and may wait.
        self.active = self.limit > 0 or self.thresholds.on
        self.queues: dict[Key, FairQueue[_Ticket]] = {}
        self.inflight: dict[Key, int] = {}
        #: Workers' last load reports (with this frontend's counts when each arrived).
        self.reports: dict[str, Report] = {}
        #: This frontend's requests let through to each model and not ended, and their prompt blocks.
        self.model_requests: dict[str, float] = {}
        self.model_blocks: dict[str, float] = {}
        self._sub: Any = None
        #: Seconds a released request took to end, averaged (for Retry-After).
        self._service: dict[Key, float] = {}
        self.waiting = 0
        self.closed = False
        self._children: dict[str, _ModelMetrics] = {}
        r = metrics.registry
        self.queued = Gauge(
            "dynvllm_admission_queue_length",
            "Requests waiting for a worker slot",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.waited = Histogram(
            "dynvllm_admission_wait_seconds",
            "Time requests waited in the admission queue",
            ["model"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.refused = Counter(
            "dynvllm_admission_refusals",
            "Requests the admission queue refused (full, timeout, closing)",
            ["model", "reason"],
            registry=r,
        )

    # ---- hooks ------------------------------------------------------------------------------
    async def enter(self, r: Admitted) -> None:
        """on_admit: return once the request may go to a worker; 503 when it cannot wait."""
        priority = request_priority(r)
        for d in r.dispatches:
            d.priority = priority  # the engine's scheduler orders by it too (policy "priority")
        if not self.active:
            return
        key = (r.entry.name, r.dispatch.terminal)
        queue = self.queues.setdefault(key, FairQueue())
        if not queue and self._free(key).any:
            self._take(r, key)
            self._metrics(key[0]).waited.observe(0.0)
            return
        if self.closed:
            raise self._refuse(key, "closing", "the frontend is shutting down")
        if self.waiting >= self.size:
            raise self._refuse(key, "full", f"the admission queue is full ({self.size} requests wait)")
        ticket = _Ticket(r, priority, str(r.notes.get("tenant") or ""))
        queue.push(ticket, ticket.priority, ticket.tenant)
        self.waiting += 1
        self._metrics(key[0]).queued.inc()
        # The ticket's own future with a timer (a fraction of asyncio.wait's cost, which is paid
        # by every request that waits, i.e. by nearly all under saturation).
        fut = ticket.fut
        timer = asyncio.get_running_loop().call_later(
            max(0.0, r.arrived + self.timeout - time.monotonic()), _expire, fut
        )
        try:
            released = await fut
        except BaseException:
            # Cancelled while waiting (which cancels the future). One released just before holds
            # a slot: its on_end frees it.
            timer.cancel()
            if fut.cancelled() or not fut.done() or fut.result() is not True:
                self._unqueue(key, queue, ticket)
            raise
        timer.cancel()
        if released is None:
            self._unqueue(key, queue, ticket)
            raise self._refuse(key, "timeout", f"no worker slot within {self.timeout:g} s")
        if not released:
            raise self._refuse(key, "closing", "the frontend is shutting down")

    def leave(self, r: Admitted, status: str) -> None:
        """on_end: free the request's slot and let the next one in."""
        held = r.notes.pop("gate", None)
        if held is None:
            return
        key, weight, blocks, since = held
        self.inflight[key] -= weight
        self.model_requests[key[0]] -= weight
        self.model_blocks[key[0]] -= blocks
        took = time.monotonic() - since
        avg = self._service.get(key)
        self._service[key] = took if avg is None else 0.9 * avg + 0.1 * took
        self._pump(key)

    def changed(self, _inst: object = None) -> None:
        """Discovery saw a worker come, go or change (woke up): capacity may have grown."""
        if len(self.reports) > 2 * sum(len(e.instances) for e in self.models.models.values()) + 16:
            live = {i for e in self.models.models.values() for i in e.instances}
            self.reports = {w: rep for w, rep in self.reports.items() if w in live}
        for key in list(self.queues):
            self._pump(key)

    def report(self, m: LoadMetrics) -> None:
        """A worker's load report: its room may have grown (or gone)."""
        model = next((e.name for e in self.models.models.values() if m.instance_id in e.instances), None)
        if model is None:
            return
        self.reports[m.instance_id] = Report(
            m.running,
            m.waiting,
            m.kv_used_blocks,
            m.kv_total_blocks,
            self.model_requests.get(model, 0.0),
            self.model_blocks.get(model, 0.0),
        )
        for key in list(self.queues):
            if key[0] == model:
                self._pump(key)

    async def watch(self, nc: Any, namespace: str) -> None:
        """Take the workers' load reports (only when a threshold on them is set)."""
        if self.thresholds.on:
            self._sub = await EventBus(nc, namespace).subscribe(LOAD, self.report)

    async def unwatch(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # NATS already closing: nothing more arrives either way
                pass

    def close(self) -> None:
        """The frontend drains: nobody waits any longer."""
        self.closed = True
        for key, queue in self.queues.items():
            while (t := queue.pop()) is not None:
                self.waiting -= 1
                self.queued.labels(key[0]).dec()
                if not t.fut.done():
                    t.fut.set_result(False)

    # ---- inside -------------------------------------------------------------------------------
    def _free(self, key: Key) -> _Free:
        """What may be let through now: request slots under the in-flight cap, and the room the
        workers' reports leave (requests, prompt blocks; unbounded where not measured). Each
        goes down by exactly what a request let through takes, so one reading serves a batch."""
        workers = ready(self.models.models.get(key[0]), key[1])
        free = free_slots(self.limit, len(workers), self.inflight.get(key, 0))
        if free <= 0 or not self.thresholds.on:
            return _Free(free, Room(INF, INF))
        loads = [(self.reports.get(inst.id), batch_size(inst)) for inst in workers]
        requests, blocks = self.model_requests.get(key[0], 0.0), self.model_blocks.get(key[0], 0.0)
        return _Free(free, room(loads, self.thresholds, requests, blocks))

    def _metrics(self, model: str) -> _ModelMetrics:
        """A model's metric children, looked up once."""
        m = self._children.get(model)
        if m is None:
            m = self._children[model] = _ModelMetrics(self.queued.labels(model), self.waited.labels(model))
        return m

    def _take(self, r: Admitted, key: Key) -> tuple[int, float]:
        weight = len(r.dispatches)
        blocks = sum(d.blocks for d in r.dispatches)
        self.inflight[key] = self.inflight.get(key, 0) + weight
        self.model_requests[key[0]] = self.model_requests.get(key[0], 0.0) + weight
        self.model_blocks[key[0]] = self.model_blocks.get(key[0], 0.0) + blocks
        r.notes["gate"] = (key, weight, blocks, time.monotonic())
        return weight, blocks

    def _pump(self, key: Key) -> None:
        queue = self.queues.get(key)
        if not queue:
            return
        free = self._free(key)
        m = self._metrics(key[0])
        while queue and free.any:
            t = queue.pop()
            assert t is not None
            self.waiting -= 1
            m.queued.dec()
            if t.fut.done():  # ran out of time or cancelled, not yet taken out by its waiter
                continue
            weight, blocks = self._take(t.r, key)
            free = free.less(weight, blocks)
            m.waited.observe(time.monotonic() - t.r.arrived)
            t.fut.set_result(True)

    def _unqueue(self, key: Key, queue: FairQueue[_Ticket], t: _Ticket) -> None:
        t.fut.cancel()
        if queue.remove(t, t.priority, t.tenant):
            self.waiting -= 1
            self.queued.labels(key[0]).dec()

    def _refuse(self, key: Key, reason: str, why: str) -> RequestError:
        self.refused.labels(key[0], reason).inc()
        return RequestError(
            503,
            f"model {key[0]!r} is saturated: {why}; try again later",
            "service_unavailable",
            headers={"retry-after": str(self._retry_after(key))},
        )

    def _retry_after(self, key: Key) -> int:
        """Seconds until the queue ahead has likely drained: its length over the slots, times the
        average time a request holds a slot."""
        slots = max(1, self.limit * ready_workers(self.models.models.get(key[0]), key[1]))
        ahead = len(self.queues.get(key) or ())
        return max(1, math.ceil((ahead / slots + 1) * self._service.get(key, 1.0)))


def request_priority(r: Admitted) -> int:
    """A header's priority (ours, else vLLM's), else the body's, else 0; a header that is not
    an integer is a 400."""
    for header, raw in _priority_headers(r.client):
        try:
            value = int(raw)
        except ValueError:
            raise RequestError(
                400, f"{header} must be an integer (lower goes first); got {raw!r}", param=header
            ) from None
        if not -(2**31) <= value < 2**31:
            raise RequestError(400, f"{header} is out of range: {raw}", param=header)
        return value
    return int(r.priority or 0)


def _priority_headers(client: Any) -> list[tuple[str, str]]:
    """The priority headers a client sent, ours first (each name's first value). Starlette's
    headers are scanned once as ASGI bytes: its case-insensitive lookup of two names that are
    almost never there cost more than the rest of admission."""
    raw = getattr(client, "raw", None)
    if raw is None:
        return [(h, v) for h in _PRIORITY_HEADERS if (v := client.get(h)) is not None]
    found: dict[str, str] = {}
    for name, value in raw:
        if name in _RAW_PRIORITY_HEADERS:
            found.setdefault(name.decode(), value.decode("latin-1"))
    return [(h, found[h]) for h in _PRIORITY_HEADERS if h in found]
