"""Tenants and their limits (pure but for `read_file`: the clock is an argument).

A tenants file names each tenant, the API keys that act for it and its limits:

    tenants:
      acme:
        keys: [sk-acme-1, "sha256:9f86d0..."]   # a key, or the hex SHA-256 of one
        requests_per_second: 5                  # sustained; `burst` requests at once (default: rps)
        tokens_per_minute: 60000                # prompt tokens at admission, completion at the end
        max_concurrent: 8                       # requests admitted and not yet ended
        models: [tiny, "qwen3-*"]               # names (shell patterns) it may ask for

`Limits.admit` decides for one request and charges it; `Limits.finish` gives back what it held.
A refusal says which limit and how long until a retry can pass. Rates refill continuously (token
buckets); completion tokens are charged once they are known, so a bucket may go below zero: the
tenant's next requests wait for it to refill.

Where several frontend processes serve one tenant, each enforces its `Share` of the tenant's limits
(`quota_shares.py` divides them; `shared_limits.py` exchanges what each process wants): a share
scales the rates and sets the concurrency this process may use. What a tenant asked for here since
the last report (`Demand`) is what its share is divided by.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: The metric label of requests whose key belongs to no tenant (an --api-key key).
NO_TENANT = "-"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DIGEST = re.compile(r"^sha256:[0-9a-fA-F]{64}$")


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(min_length=1)
    requests_per_second: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, ge=1)
    models: list[str] | None = None

    @field_validator("keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if not k.strip():
                raise ValueError("a key is empty")
            if k.startswith("sha256:") and not _DIGEST.match(k):
                raise ValueError(f"{k[:20]}...: a sha256: key is 'sha256:' and 64 hex digits")
        return keys

    def allows(self, model: str, base: str | None) -> bool:
        """Whether the tenant may ask for `model` (or, for an alias, the model `base` it names)."""
        if self.models is None:
            return True
        return any(fnmatch.fnmatchcase(n, pat) for pat in self.models for n in (model, base) if n)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, TenantSpec]


def key_digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def _digest_of(key: str) -> str:
    return key[7:].lower() if _DIGEST.match(key) else key_digest(key.encode())


def parse(text: str, json_syntax: bool = False) -> dict[str, TenantSpec]:
    """A tenants file's tenants; ValueError says what is wrong, and where."""
    try:
        if json_syntax:
            raw = json.loads(text)
        else:
            import yaml  # YAML is a superset of JSON: either syntax reads here

            raw = yaml.safe_load(text)
    except Exception as exc:
        raise ValueError(f"not valid {'JSON' if json_syntax else 'YAML'}: {exc}") from None
    try:
        tenants = _File.model_validate(raw).tenants
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise ValueError(f"{where}: {first['msg']}") from None
    owner: dict[str, str] = {}
    for name, spec in tenants.items():
        if not _NAME.match(name):
            raise ValueError(f"tenant name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        for k in spec.keys:
            d = _digest_of(k)
            if d in owner:
                raise ValueError(f"a key of tenant {name!r} is also a key of tenant {owner[d]!r}")
            owner[d] = name
    return tenants


def read_file(path: Path) -> dict[str, TenantSpec]:
    """The tenants of a file; ValueError names the file and the problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"tenants file {path}: {exc.strerror or exc}") from None
    try:
        return parse(text, json_syntax=path.suffix.lower() == ".json")
    except ValueError as exc:
        raise ValueError(f"tenants file {path}: {exc}") from None


@dataclass
class TokenBucket:
    """`rate` units per second up to `capacity`; a take may leave it below zero (a debt)."""

    rate: float
    capacity: float
    level: float
    stamp: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (amounts above the capacity need a full bucket)."""
        self.refill(now)
        short = min(amount, self.capacity) - self.level
        return 0.0 if short <= 0 else short / self.rate

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass
class Refusal:
    #: Which limit: "model", "concurrency", "requests" or "tokens".
    reason: str
    message: str
    retry_after: float = 0.0


@dataclass(frozen=True)
class Share:
    """The part of a tenant's limits one frontend process may use: fractions of its rates, and
    how many concurrent requests (None: the whole limit)."""

    requests: float = 1.0
    tokens: float = 1.0
    concurrent: int | None = None


WHOLE = Share()


@dataclass
class Demand:
    """What a tenant asked of this process since the last report."""

    #: Requests that reached the limits (admitted or refused).
    requests: int = 0
    #: Tokens charged or refused (prompt tokens of every request, completion tokens at the end).
    tokens: int = 0
    #: Requests refused because every concurrent slot of this process's share was taken.
    blocked: int = 0


@dataclass
class TenantState:
    spec: TenantSpec
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    inflight: int = 0
    #: Prompt tokens of requests admitted and not yet ended (a refund needs them).
    pending: dict[int, int] = field(default_factory=dict)
    share: Share = WHOLE
    demand: Demand = field(default_factory=Demand)

    def configure(self, spec: TenantSpec, now: float) -> None:
        """Apply (new) limits or a new share; what the buckets hold carries over, within the new
        capacities."""
        self.spec = spec
        rps, part = spec.requests_per_second, self.share.requests
        self.requests = _bucket(self.requests, rps * part if rps else None, _burst(spec) * part, now)
        tpm, part = spec.tokens_per_minute, self.share.tokens
        self.tokens = _bucket(self.tokens, tpm * part / 60.0 if tpm else None, (tpm or 0) * part, now)

    @property
    def max_concurrent(self) -> int | None:
        """The concurrent requests this process may hold for the tenant."""
        if self.spec.max_concurrent is None:
            return None
        given = self.share.concurrent
        return self.spec.max_concurrent if given is None else min(given, self.spec.max_concurrent)


def _told(wait: float, part: float) -> float:
    """The wait a refusal tells: with a share of the limits, as at the whole rate (the share
    follows demand, so a retry finds a larger one); never 0 for a refusal."""
    if wait <= 0:
        return 0.0
    return max(0.01, wait * part) if part > 0 else 1.0


def _burst(spec: TenantSpec) -> float:
    rps = spec.requests_per_second or 0.0
    return float(spec.burst or max(1.0, rps))


def _bucket(old: TokenBucket | None, rate: float | None, capacity: float, now: float) -> TokenBucket | None:
    if rate is None:
        return None
    # A share below one request (or token) would never let one through: a bucket holds one at least.
    capacity = max(1.0, capacity)
    rate = max(rate, 1e-9)
    if old is None:
        return TokenBucket.full(rate, capacity, now)
    old.refill(now)
    return TokenBucket(rate, capacity, min(old.level, capacity), now)


#: Keys and (tenant, model) answers remembered at most; past it they are worked out each time.
_REMEMBERED = 4096


class Limits:
    """Every tenant's limits and what each has in use."""

    def __init__(self, tenants: dict[str, TenantSpec], now: float) -> None:
        self.states: dict[str, TenantState] = {}
        self._by_digest: dict[str, str] = {}
        self.update(tenants, now)

    def update(self, tenants: dict[str, TenantSpec], now: float) -> None:
        """A reloaded file: tenants that stay keep their buckets and in-flight count."""
        states: dict[str, TenantState] = {}
        for name, spec in tenants.items():
            state = self.states.get(name) or TenantState(spec)
            state.configure(spec, now)
            states[name] = state
        self.states = states
        self._by_digest = {_digest_of(k): name for name, spec in tenants.items() for k in spec.keys}
        self._by_key: dict[bytes, str | None] = {}
        self._allowed: dict[tuple[str, str, str | None], bool] = {}

    def tenant_of(self, key: bytes | None) -> str | None:
        if key is None:
            return None
        # Remembered: a digest per request costs more than the rest of the check (bounded: any
        # client may send any key).
        name = self._by_key.get(key, "")
        if name == "":
            name = self._by_digest.get(key_digest(key))
            if len(self._by_key) < _REMEMBERED:
                self._by_key[key] = name
        return name

    def allows(self, name: str, model: str, base: str | None) -> bool:
        """`TenantSpec.allows`, remembered (its patterns are matched once per model name)."""
        known = self._allowed.get((name, model, base))
        if known is None:
            state = self.states.get(name)
            known = state is None or state.spec.allows(model, base)
            if len(self._allowed) < _REMEMBERED:
                self._allowed[(name, model, base)] = known
        return known

    def set_share(self, name: str, share: Share, now: float) -> None:
        """This process's part of tenant `name`'s limits (see `quota_shares.allocate`)."""
        state = self.states.get(name)
        if state is None or state.share == share:
            return
        state.share = share
        state.configure(state.spec, now)

    def take_demand(self) -> dict[str, Demand]:
        """Each tenant's demand since the last call, and a fresh count from here."""
        out = {}
        for name, state in self.states.items():
            out[name], state.demand = state.demand, Demand()
        return out

    def admit(
        self, name: str, ticket: int, model: str, base: str | None, prompt_tokens: int, now: float
    ) -> Refusal | None:
        """Charge request `ticket` of tenant `name` (one request, its prompt tokens, a concurrent
        slot), or say which limit it is over; nothing is charged when it is refused."""
        state = self.states.get(name)
        if state is None:
            return None
        spec = state.spec
        if not self.allows(name, model, base):
            return Refusal("model", f"The model {model!r} does not exist or you do not have access to it.")
        demand = state.demand
        demand.requests += 1
        demand.tokens += prompt_tokens
        cap = state.max_concurrent
        if cap is not None and state.inflight >= cap:
            demand.blocked += 1
            return Refusal(
                "concurrency",
                f"Tenant {name!r} has its limit of {spec.max_concurrent} concurrent requests in "
                "progress; retry once one has finished.",
                1.0,
            )
        if state.requests is not None:
            wait = _told(state.requests.wait(1, now), state.share.requests)
            if wait > 0:
                return Refusal(
                    "requests",
                    f"Rate limit reached for tenant {name!r} on requests per second: limit "
                    f"{spec.requests_per_second:g}. Please try again in {wait:.2f}s.",
                    wait,
                )
        if state.tokens is not None:
            wait = _told(state.tokens.wait(prompt_tokens, now), state.share.tokens)
            if wait > 0:
                return Refusal(
                    "tokens",
                    f"Rate limit reached for tenant {name!r} on tokens per minute: limit "
                    f"{spec.tokens_per_minute}, requested {prompt_tokens}. Please try again in {wait:.2f}s.",
                    wait,
                )
        if state.requests is not None:
            state.requests.take(1, now)
        if state.tokens is not None:
            state.tokens.take(prompt_tokens, now)
        state.inflight += 1
        state.pending[ticket] = prompt_tokens
        return None

    def finish(self, name: str, ticket: int, completion_tokens: int, ran: bool, now: float) -> None:
        """Request `ticket` ended: charge its completion tokens and free its slot. One that never
        ran (refused after this check, e.g. by a full queue) is given back what it was charged."""
        state = self.states.get(name)
        if state is None or ticket not in state.pending:
            return  # a tenant removed from the file since: nothing to account
        prompt = state.pending.pop(ticket)
        state.inflight -= 1
        if state.tokens is not None:
            if ran:
                state.tokens.take(completion_tokens, now)
                state.demand.tokens += completion_tokens
            else:
                state.tokens.give(prompt, now)
        if not ran and state.requests is not None:
            state.requests.give(1, now)
