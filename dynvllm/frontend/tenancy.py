"""Tenants on the request path (`--tenants-file`): the file read and re-read when it changes, a
request's API key mapped to its tenant, `Limits` (see `tenants.py`) asked at admission and told at
the end, refusals as 429s with Retry-After, per-tenant metrics.

Limits are kept by each frontend process: with --http-workers N, or several frontends, a tenant
gets up to N times its limits.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import Counter, Gauge

from dynvllm.frontend import tenants
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.request_path import Admitted
from dynvllm.frontend.surface import Surface
from dynvllm.frontend.tenants import read_file

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

    # ---- hooks ----------------------------------------------------------------------------
    async def admit(self, r: Admitted) -> None:
        """on_admit: charge the request to its tenant, or refuse it."""
        self.maybe_reload()
        raw = {k.lower().encode("latin-1"): v.encode("latin-1") for k, v in r.client.items()}
        name = self.tenant_of(raw)
        r.notes["tenant"] = name or tenants.NO_TENANT
        if name is None:
            return  # a key of --api-key: no tenant, no limits
        ticket = next(self._tickets)
        prompt = sum(len(p.prompt_ids) for p in r.parts)
        base = r.entry.name if r.dispatch.lora is None else None
        refusal = self.limits.admit(name, ticket, r.model, base, prompt, self.clock())
        if refusal is not None:
            self.refusals.labels(name, refusal.reason).inc()
            raise _error(refusal)
        r.notes["tenant.ticket"] = ticket
        self.tokens.labels(name, "prompt").inc(prompt)
        self.inflight.labels(name).inc()

    def end(self, r: Admitted, status: str) -> None:
        """on_end: its completion tokens charged, its slot freed (all given back if it never ran)."""
        name = r.notes.get("tenant")
        if name is None:
            return  # refused before this hook ran
        self.requests.labels(name, status).inc()
        ticket = r.notes.pop("tenant.ticket", None)
        if ticket is None:
            return
        completion = 0 if r.refused else r.usage().completion_tokens
        self.limits.finish(name, ticket, completion, not r.refused, self.clock())
        self.inflight.labels(name).dec()
        if completion:
            self.tokens.labels(name, "completion").inc(completion)


def _error(refusal: tenants.Refusal) -> RequestError:
    if refusal.reason == "model":
        return RequestError(404, refusal.message, param="model", code="model_not_found")
    # OpenAI's shape: type names the limit ("requests", "tokens"), code says it is a rate limit.
    kind = "tokens" if refusal.reason == "tokens" else "requests"
    wait = str(max(1, math.ceil(refusal.retry_after)))
    return RequestError(429, refusal.message, kind, code="rate_limit_exceeded", headers={"retry-after": wait})
