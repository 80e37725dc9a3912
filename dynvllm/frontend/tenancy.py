"""Tenants on the request path (`--tenants-file`): the file read and re-read when it changes, a
request's API key mapped to its tenant, `Limits` (see `tenants.py`) asked at admission and told at
the end, refusals as 429s with Retry-After, per-tenant metrics.

With other frontend processes on the same NATS (--http-workers, frontends on other hosts), each
enforces its share of every tenant's limits (`shared_limits.py`): the limits hold for the whole
service, and no request waits on the network to be checked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge

from dynvllm.frontend import tenants
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.request_path import Admitted
from dynvllm.frontend.shared_limits import SharedLimits
from dynvllm.frontend.surface import Surface
from dynvllm.frontend.tenants import read_file
from dynvllm.settings import Settings

log = logging.getLogger("dynvllm.frontend")

#: Seconds between checks of the file's modification time (a stat, on the request path).
CHECK_EVERY = 1.0


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime, st.st_size


class Tenants:
    def __init__(
        self,
        path: Path,
        surfaces: Sequence[Surface],
        metrics: FrontendMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path, self.surfaces, self.clock = path, list(surfaces), clock
        self._stamp = _stamp(path)
        self.limits = tenants.Limits(read_file(path), clock())
        self._checked = clock()
        self._tickets = itertools.count()
        self._children: dict[str, _TenantMetrics] = {}
        self._ended: dict[tuple[str, str], Any] = {}
        #: The exchange with other frontend processes, once started (None: this process alone).
        self.shared: SharedLimits | None = None
        r = metrics.registry
        # Labels: tenant names from the file (and "-"), statuses, four reasons: a bounded set.
        self.requests = Counter(
            "dynvllm_tenant_requests", "Requests by tenant and status", ["tenant", "status"], registry=r
        )
        self.refusals = Counter(
            "dynvllm_tenant_refusals",
            "Requests refused by a tenant limit (model, concurrency, requests, tokens)",
            ["tenant", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "dynvllm_tenant_tokens",
            "Tokens charged by tenant (prompt, completion)",
            ["tenant", "kind"],
            registry=r,
        )
        self.inflight = Gauge(
            "dynvllm_tenant_inflight_requests",
            "Requests of a tenant admitted and not yet ended",
            ["tenant"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # Summed over the processes of one frontend; over every frontend of the service it is 1.
        self.share = Gauge(
            "dynvllm_tenant_limit_share",
            "Part of a tenant's request rate this frontend may use (frontends divide it by demand)",
            ["tenant"],
            registry=r,
            multiprocess_mode="livesum",
        )

    # ---- the file -----------------------------------------------------------------------
    def maybe_reload(self) -> None:
        """Read the file again if it changed (checked at most every CHECK_EVERY seconds). A file
        that became invalid is logged and the limits in force stay."""
        now = self.clock()
        if now - self._checked < CHECK_EVERY:
            return
        self._checked = now
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            specs = read_file(self.path)
        except ValueError as exc:
            log.error("%s; keeping the tenants loaded before", exc)
            return
        self.limits.update(specs, now)
        log.warning("tenants file %s reloaded: %d tenants", self.path, len(specs))

    async def start_sharing(self, nc: Any, settings: Settings) -> SharedLimits:
        """Start dividing the limits with the other frontend processes (before the first request)."""
        rt = settings.runtime
        shared = SharedLimits(
            nc,
            rt.namespace,
            self.limits,
            settings.frontend.tenant_sync_interval,
            rt.lease_ttl,
            on_divide=self.shares_divided,
        )
        await shared.start()
        self.shared = shared
        return shared

    def shares_divided(self) -> None:
        """The frontends divided the limits anew (`SharedLimits`): show this process's parts."""
        for name, state in self.limits.states.items():
            if state.spec.requests_per_second:
                self.share.labels(name).set(state.share.requests)

    # ---- keys -----------------------------------------------------------------------------
    def accepts(self, key: bytes | None) -> bool:
        """Whether `key` is some tenant's (for the API-key check)."""
        self.maybe_reload()
        return self.limits.tenant_of(key) is not None

    def tenant_of(self, headers: dict[bytes, bytes]) -> str | None:
        for s in self.surfaces:
            name = self.limits.tenant_of(s.presented_key(headers))
            if name is not None:
                return name
        return None

    def may_use(self, headers: Mapping[str, str], model: str, base: str | None) -> bool:
        """Whether the client's tenant may use `model` (a key of no tenant: every model)."""
        name = self.tenant_of(_raw(headers))
        return name is None or self.limits.allows(name, model, base)

    # ---- hooks ----------------------------------------------------------------------------
    async def admit(self, r: Admitted) -> None:
        """on_admit: charge the request to its tenant, or refuse it."""
        self.maybe_reload()
        name = self.tenant_of(_raw(r.client))
        r.notes["tenant"] = name or tenants.NO_TENANT
        if name is None:
            return  # a key of --api-key: no tenant, no limits
        ticket = next(self._tickets)
        prompt = sum(len(p.prompt_ids) for p in r.parts)
        base = r.entry.name if r.dispatch.lora is None else None
        refusal = self.limits.admit(name, ticket, r.model, base, prompt, self.clock())
        if refusal is not None and refusal.reason == "concurrency":
            refusal = await self._slot_elsewhere(name, ticket, r, base, prompt, refusal)
        if refusal is not None:
            self.refusals.labels(name, refusal.reason).inc()
            raise _error(refusal)
        r.notes["tenant.ticket"] = ticket
        m = self._metrics(name)
        m.prompt.inc(prompt)
        m.inflight.inc()

    async def _slot_elsewhere(
        self, name: str, ticket: int, r: Admitted, base: str | None, prompt: int, refusal: tenants.Refusal
    ) -> tenants.Refusal | None:
        """A request short of a concurrent slot in this process's share while the tenant has free
        slots in the service waits for the next division (a few intervals at most), which gives
        this process a slot: None once admitted, else the refusal."""
        shared = self.shared
        if shared is None:
            return refusal
        deadline = self.clock() + 3 * shared.interval
        while shared.headroom(name) and (left := deadline - self.clock()) > 0:
            try:
                await asyncio.wait_for(shared.divided.wait(), left)
            except TimeoutError:
                break
            again = self.limits.admit(name, ticket, r.model, base, prompt, self.clock())
            if again is None or again.reason != "concurrency":
                return again
        return refusal

    def end(self, r: Admitted, status: str) -> None:
        """on_end: its completion tokens charged, its slot freed (all given back if it never ran)."""
        name = r.notes.get("tenant")
        if name is None:
            return  # refused before this hook ran
        done = self._ended.get((name, status))
        if done is None:  # labels() costs more than the count; tenants x statuses stay few
            done = self._ended[(name, status)] = self.requests.labels(name, status)
        done.inc()
        ticket = r.notes.pop("tenant.ticket", None)
        if ticket is None:
            return
        completion = 0 if r.refused else r.usage().completion_tokens
        self.limits.finish(name, ticket, completion, not r.refused, self.clock())
        m = self._metrics(name)
        m.inflight.dec()
        if completion:
            m.completion.inc(completion)

    def _metrics(self, name: str) -> _TenantMetrics:
        """A tenant's metric children, looked up once (`labels()` costs more than the update)."""
        m = self._children.get(name)
        if m is None:
            m = self._children[name] = _TenantMetrics(
                self.tokens.labels(name, "prompt"),
                self.tokens.labels(name, "completion"),
                self.inflight.labels(name),
            )
        return m


class _TenantMetrics(NamedTuple):
    prompt: Any
    completion: Any
    inflight: Any


def _raw(headers: Mapping[str, str]) -> dict[bytes, bytes]:
    """Headers as the surfaces read keys from them: the ASGI bytes where the request has them."""
    raw = getattr(headers, "raw", None)  # Starlette's Headers: lower-case names, as sent
    if raw is not None:
        return dict(raw)
    return {k.lower().encode("latin-1"): v.encode("latin-1") for k, v in headers.items()}


def _error(refusal: tenants.Refusal) -> RequestError:
    if refusal.reason == "model":
        return RequestError(404, refusal.message, param="model", code="model_not_found")
    # OpenAI's shape: type names the limit ("requests", "tokens"), code says it is a rate limit.
    kind = "tokens" if refusal.reason == "tokens" else "requests"
    wait = str(max(1, math.ceil(refusal.retry_after)))
    return RequestError(429, refusal.message, kind, code="rate_limit_exceeded", headers={"retry-after": wait})
