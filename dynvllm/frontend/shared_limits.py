"""Tenants' limits held across frontend processes (`--http-workers`, frontends on other hosts):
each process reports what its tenants asked of it over NATS and enforces its share of their
limits locally (`quota_shares.py` divides them). A request never waits on the network: the
exchange runs beside the requests, every `--tenant-sync-interval` seconds.

Subject under the namespace:
    tenants.usage.<process>   msgpack {"t": {tenant: Usage.pack()}} or {"bye": true}

A process silent for a lease (`--lease-ttl`) is gone: the others divide its part among themselves
at their next report. One that stops says goodbye and is dropped at once. Silence counts only
while this process's own loop runs: when it was held up (a CPU-starved host), the others' reports
may be waiting unread in its queue, and the time it stood still says nothing about them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from dynvllm.frontend.quota_shares import IDLE, Usage, allocate
from dynvllm.frontend.tenants import Demand, Limits, Share

log = logging.getLogger("dynvllm.frontend.tenants")

#: Weight of the newest interval in a demand's smoothed rate (time constant ~3 intervals).
SMOOTHING = 0.3


class SharedLimits:
    def __init__(
        self,
        nc: Any,
        namespace: str,
        limits: Limits,
        interval: float = 0.1,
        silence: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_divide: Callable[[], None] | None = None,
    ) -> None:
        self.nc, self.limits, self.interval, self.silence, self.clock = nc, limits, interval, silence, clock
        self.on_divide = on_divide
        self.id = secrets.token_hex(6)
        self._subject = f"{namespace}.tenants.usage"
        #: Every live process's last report, this one's included: (when heard, tenant -> usage).
        self.reports: dict[str, tuple[float, dict[str, Usage]]] = {}
        #: Per tenant, its smoothed demand here: (requests/s, tokens/s).
        self._rates: dict[str, tuple[float, float]] = {}
        #: Per tenant, this process's shares divided within the last interval (and the one before).
        self._recent: dict[str, deque[tuple[float, Share]]] = {}
        self._last = clock()
        self._sub: Any = None
        self._task: asyncio.Task | None = None
        #: Set each time the shares were divided anew (a request short of a slot may wait for it).
        self.divided = asyncio.Event()

    async def start(self) -> None:
        """Join: report at once, and hear the others for a moment before serving, so that this
        process starts with its share rather than with the whole limits."""
        self._sub = await self.nc.subscribe(self._subject + ".*", cb=self._on_report)
        await self._report()
        await asyncio.sleep(min(1.0, 2.5 * self.interval))
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.nc.publish(f"{self._subject}.{self.id}", msgpack.packb({"bye": True}))
            await self._sub.unsubscribe()
        except Exception as exc:  # the connection is gone: peers notice the silence instead
            log.debug("goodbye to the other frontends not sent: %s", exc)

    def peers(self) -> int:
        """Live processes, this one included."""
        return len(self.reports)

    def headroom(self, tenant: str) -> bool:
        """Whether the tenant had free concurrent slots across all processes at the last reports
        (a request refused here for a slot may get one once the shares are divided anew)."""
        state = self.limits.states.get(tenant)
        cap = state.spec.max_concurrent if state is not None else None
        if cap is None:
            return False
        assert state is not None
        others = sum(u.get(tenant, IDLE).inflight for k, (_, u) in self.reports.items() if k != self.id)
        return state.inflight + others < cap

    # ---- inside ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        last = self.clock()
        while True:
            await asyncio.sleep(self.interval)
            now = self.clock()
            self._excuse(now - last - self.interval)
            last = now
            try:
                self._expire()
                await self._report()
            except Exception as exc:  # NATS away: limits stay as last divided
                log.debug("tenant usage report not sent: %s", exc)

    def _excuse(self, stalled: float) -> None:
        """This loop woke `stalled` seconds late: the others' silence during that time is not
        counted (their reports may be queued here, unread)."""
        if stalled <= self.interval:
            return
        self.reports = {
            k: (heard + stalled if k != self.id else heard, usage)
            for k, (heard, usage) in self.reports.items()
        }

    def _usage(self) -> dict[str, Usage]:
        now = self.clock()
        dt = max(1e-3, now - self._last)
        self._last = now
        out = {}
        taken = self.limits.take_demand()
        for name, state in self.limits.states.items():
            d = taken.get(name, Demand())
            old_r, old_t = self._rates.get(name, (0.0, 0.0))
            r = SMOOTHING * d.requests / dt + (1 - SMOOTHING) * old_r
            t = SMOOTHING * d.tokens / dt + (1 - SMOOTHING) * old_t
            self._rates[name] = (r, t)
            wanted = state.inflight + d.blocked
            if r or t or wanted:
                out[name] = Usage(r, t, wanted, state.inflight)
        self._rates = {k: v for k, v in self._rates.items() if k in self.limits.states}
        return out

    async def _report(self) -> None:
        usage = self._usage()
        # This process's own report counts from the moment it is sent, as at its peers.
        self.reports[self.id] = (self.clock(), usage)
        self._divide()
        body = {"t": {k: u.pack() for k, u in usage.items()}}
        await self.nc.publish(f"{self._subject}.{self.id}", msgpack.packb(body))

    async def _on_report(self, msg: Any) -> None:
        sender = msg.subject.rsplit(".", 1)[-1]
        if sender == self.id:
            return
        try:
            body = msgpack.unpackb(msg.data, raw=False)
            if body.get("bye"):
                self.reports.pop(sender, None)
            else:
                usage = {k: Usage.unpack(v) for k, v in body["t"].items()}
                self.reports[sender] = (self.clock(), usage)
        except Exception as exc:  # one bad report must not stop the others
            log.warning("unreadable tenant usage report from %s: %r", sender, exc)
            return
        self._divide()

    def _expire(self) -> None:
        now = self.clock()
        for k, (heard, _) in list(self.reports.items()):
            if k != self.id and now - heard > self.silence:
                del self.reports[k]
                log.warning("frontend process %s went silent; its share of tenant limits is divided", k)

    def _divide(self) -> None:
        """This process's shares from the reports heard so far. A share that shrinks applies at
        once, one that grows only after an interval: by then every process has heard the report
        that moved the parts, and has shrunk its own (see docs/operations.md for the bound)."""
        now = self.clock()
        for name, state in self.limits.states.items():
            usages = {k: u.get(name, IDLE) for k, (_, u) in self.reports.items()}
            usages.setdefault(self.id, IDLE)
            recent = self._recent.setdefault(name, deque())
            recent.append((now, allocate(state.spec, usages)[self.id]))
            while len(recent) > 1 and recent[1][0] <= now - self.interval:
                recent.popleft()
            self.limits.set_share(name, _least([s for _, s in recent]), now)
        for gone in set(self._recent) - set(self.limits.states):
            del self._recent[gone]
        if self.on_divide is not None:
            self.on_divide()
        self.divided.set()
        self.divided.clear()


def _least(shares: list[Share]) -> Share:
    concurrent = [s.concurrent for s in shares if s.concurrent is not None]
    return Share(
        min(s.requests for s in shares),
        min(s.tokens for s in shares),
        min(concurrent) if concurrent else None,
    )
