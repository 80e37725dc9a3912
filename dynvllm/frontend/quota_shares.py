"""Dividing a tenant's limits between the frontend processes that serve it (pure: no clock, no I/O).

Every process publishes, every interval, what each tenant asked of it (`Usage`); every process
divides each tenant's limits with the same function over the same reports, so the parts add up to
the limits and nobody asks anyone at request time. A process enforces only its own part, locally
(`tenants.Share`).

- Rates (requests/s, tokens/min): max-min fair by demand (a process that asks for less than an
  equal part gets what it asks for, the rest share what is left), and what nobody asks for is
  split equally, so a process with no traffic yet can still admit its first request.
- Concurrency: a process keeps what it holds (its in-flight requests, as reported); the free slots
  go max-min fair by the slots each wanted beyond that, the rest equally; whole slots, the
  remainders by largest fraction, ties by process id: every process computes the same parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynvllm.frontend.tenants import Share, TenantSpec


@dataclass(frozen=True)
class Usage:
    """One process's report for one tenant."""

    #: Requests per second asked for (admitted or refused), smoothed.
    requests: float = 0.0
    #: Tokens per second asked for, smoothed.
    tokens: float = 0.0
    #: Concurrent requests it wants: those in flight plus those refused for want of a slot.
    concurrent: int = 0
    #: Requests in flight when it reported.
    inflight: int = 0

    def pack(self) -> list[float | int]:
        return [round(self.requests, 4), round(self.tokens, 2), self.concurrent, self.inflight]

    @classmethod
    def unpack(cls, raw: list) -> Usage:
        requests, tokens, concurrent, inflight = raw
        return cls(float(requests), float(tokens), int(concurrent), int(inflight))


IDLE = Usage()


def fair(total: float, demands: dict[str, float]) -> dict[str, float]:
    """Max-min fair parts of `total` by demand; what is left once every demand is met is split
    equally. The parts add up to `total`."""
    parts = dict.fromkeys(demands, 0.0)
    left, open_ = total, sorted(demands, key=lambda k: (demands[k], k))
    while open_ and left > 0:
        level = left / len(open_)
        k = open_[0]
        if demands[k] > level:
            # Every one still open wants more than an equal part: each gets the equal part.
            for k in open_:
                parts[k] += level
            return parts
        parts[k] += demands[k]
        left -= demands[k]
        open_.pop(0)
    if demands and left > 0:
        for k in parts:
            parts[k] += left / len(parts)
    return parts


def whole(total: int, floors: dict[str, int], wanted: dict[str, int]) -> dict[str, int]:
    """Integer parts of `total`: each keeps its floor (what it holds), the free ones go fairly by
    what each wants beyond it; they add up to `total` unless the floors alone exceed it."""
    held = sum(floors.values())
    if held >= total:
        return dict(floors)
    extra = fair(float(total - held), {k: float(max(0, wanted.get(k, 0) - floors[k])) for k in floors})
    parts = {k: floors[k] + math.floor(extra[k] + 1e-9) for k in floors}
    rest = total - sum(parts.values())
    by_fraction = sorted(floors, key=lambda k: (-(extra[k] - math.floor(extra[k] + 1e-9)), k))
    for k in by_fraction[:rest]:
        parts[k] += 1
    return parts


def allocate(spec: TenantSpec, usages: dict[str, Usage]) -> dict[str, Share]:
    """Each process's share of one tenant's limits, from every live process's report (one
    without traffic for the tenant reports `IDLE`)."""
    if not usages:
        return {}
    n = len(usages)
    rps = spec.requests_per_second
    requests = fair(1.0, {k: u.requests / rps for k, u in usages.items()}) if rps else None
    tpm = spec.tokens_per_minute
    tokens = fair(1.0, {k: u.tokens * 60.0 / tpm for k, u in usages.items()}) if tpm else None
    concurrent = None
    if spec.max_concurrent is not None:
        concurrent = whole(
            spec.max_concurrent,
            {k: u.inflight for k, u in usages.items()},
            {k: u.concurrent for k, u in usages.items()},
        )
    return {
        k: Share(
            requests[k] if requests is not None else 1.0 / n,
            tokens[k] if tokens is not None else 1.0 / n,
            concurrent[k] if concurrent is not None else None,
        )
        for k in usages
    }


def bound(spec: TenantSpec, processes: int, seconds: float) -> dict[str, float]:
    """The most N processes that agree on their reports can admit in `seconds` (see
    docs/operations.md): the sustained rate, the whole burst, and one more request (or token
    bucket's worth of one token) per process where a share's bucket is raised to one."""
    out: dict[str, float] = {}
    if spec.requests_per_second:
        burst = float(spec.burst or max(1.0, spec.requests_per_second))
        out["requests"] = spec.requests_per_second * seconds + burst + (processes - 1)
    if spec.tokens_per_minute:
        out["tokens"] = spec.tokens_per_minute / 60.0 * seconds + spec.tokens_per_minute + (processes - 1)
    if spec.max_concurrent is not None:
        out["concurrent"] = float(spec.max_concurrent)
    return out
