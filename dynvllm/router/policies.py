"""Routing policies: the frontend's `--router NAME` loads one from the entry-point group
`dynvllm.router_policies` (these, the first-party ones, are registered there like any other).

Pure logic: candidates, the prompt and the load the frontend has sent in, one choice out. A policy
that keeps a KV index says so (`uses_kv_events`, `keeps_index`); the frontend never tests names.
A policy is built from the whole `Settings`, so one that declares its own settings group (under
`dynvllm.settings`, named like the policy) reads it with `settings.plugin(NAME)`.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from dynvllm import registry
from dynvllm.router import hashing
from dynvllm.router.index import KvIndex, Worker
from dynvllm.router.kv_policy import Decision, KvPolicy
from dynvllm.router.snapshot import Part, Snapshot, cut_over
from dynvllm.runtime.kv_topic import KvEventBatch
from dynvllm.settings import RouterSettings, Settings


@dataclass
class Load:
    """What the frontend has in flight on each worker: requests and the distinct prompt blocks
    they hold, per instance and per (instance, data-parallel rank); and how many ranks each
    instance has. Requests sharing a prefix on one engine share its blocks, so a block counts once
    however many requests in flight there hold it. `contexts` counts every request's whole context
    (prompt and output so far) instead, shared prefix included: what a decode step reads."""

    inflight: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    active_blocks: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    rank_blocks: dict[tuple[str, int], float] = field(default_factory=lambda: defaultdict(float))
    contexts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    rank_contexts: dict[tuple[str, int], float] = field(default_factory=lambda: defaultdict(float))
    #: With a decode weight w > 0: (1 - w) x active blocks + w x contexts, kept as they change so
    #: that a choice among thousands of workers reads it as it reads the active blocks.
    decode_weight: float = 0.0
    blended: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    rank_blended: dict[tuple[str, int], float] = field(default_factory=lambda: defaultdict(float))
    #: Instance id -> its data-parallel ranks (first rank, count); absent means one engine.
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: (instance, rank) -> block key -> requests in flight there holding it.
    held: dict[tuple[str, int], dict[int, int]] = field(default_factory=dict)
    #: A prompt's first block key -> (instance, rank) -> requests in flight there starting so.
    starts: dict[int, dict[tuple[str, int], int]] = field(default_factory=dict)

    def add(self, worker: str, rank: int, blocks: float, keys: Sequence[int]) -> None:
        """A request starts: its blocks not yet held there, and its partial last block."""
        if keys:
            on = self.starts.setdefault(keys[0], {})
            on[(worker, rank)] = on.get((worker, rank), 0) + 1
        held = self.held.setdefault((worker, rank), {})
        get = held.get
        new = 0
        for k in keys:
            c = get(k, 0)
            held[k] = c + 1
            new += not c
        self._change(worker, rank, new + max(0.0, blocks - len(keys)), blocks)

    def remove(self, worker: str, rank: int, blocks: float, keys: Sequence[int]) -> None:
        if keys and (on := self.starts.get(keys[0])) and (c := on.get((worker, rank))):
            if c > 1:
                on[(worker, rank)] = c - 1
            elif len(on) > 1:
                del on[(worker, rank)]
            else:
                del self.starts[keys[0]]
        held = self.held.get((worker, rank), {})
        gone = 0
        for k in keys:
            c = held.get(k, 0)
            if c > 1:
                held[k] = c - 1
            elif c:
                del held[k]
                gone += 1
        self._change(worker, rank, -(gone + max(0.0, blocks - len(keys))), -blocks)

    def count(self, worker: str, rank: int, delta: float) -> None:
        """A request's output filled (or, ending, freed) `delta` blocks there: its own."""
        self._change(worker, rank, delta, delta)

    def _change(self, worker: str, rank: int, distinct: float, context: float) -> None:
        """The worker's distinct blocks and its requests' contexts moved by these; the blend too."""
        target = (worker, rank)
        self.active_blocks[worker] = max(0.0, self.active_blocks[worker] + distinct)
        self.rank_blocks[target] = max(0.0, self.rank_blocks[target] + distinct)
        self.contexts[worker] = max(0.0, self.contexts[worker] + context)
        self.rank_contexts[target] = max(0.0, self.rank_contexts[target] + context)
        if (w := self.decode_weight) > 0:
            delta = (1.0 - w) * distinct + w * context
            self.blended[worker] = max(0.0, self.blended[worker] + delta)
            self.rank_blended[target] = max(0.0, self.rank_blended[target] + delta)

    def load(self, keys: Sequence[int], per_rank: bool, predicted: bool) -> Mapping:
        """What `KvPolicy` weighs a worker's load by, by instance (or by (instance, rank) with
        `per_rank`): its active blocks, moved `decode_weight` w of the way to its requests'
        contexts, (1 - w) x distinct + w x contexts. Where no two requests share a block the two
        agree; a prefix that n requests share counts (1 - w + n w) times. `predicted`: less the
        leading blocks of `keys` requests in flight there hold (`others`)."""
        w = self.decode_weight
        if w > 0:
            blocks = self.rank_blended if per_rank else self.blended
        else:
            blocks = self.rank_blocks if per_rank else self.active_blocks
        return self.others(keys, blocks, per_rank, 1.0 - w) if predicted else blocks

    def others(self, keys: Sequence[int], blocks: dict, per_rank: bool, share: float = 1.0) -> Mapping:
        """`blocks` (active blocks by instance, or by (instance, rank) with `per_rank`) less the
        leading blocks of `keys` that requests in flight there hold already: a request with that
        prefix shares them there, it does not add to them (block keys chain, so a held key holds
        the prefix before it too). This also keeps frontends that share their load choosing alike
        for a prompt sent to several at once: one that has heard of a peer's request for the same
        prompt finds its worker no dearer for it, where counting that request's whole prompt as
        load turned such a frontend to another worker than those that had not heard yet. `share`:
        how much of each such block `blocks` counts (1 - w in the decode-weighted blend)."""
        on = self.starts.get(keys[0]) if keys else None
        if not on:
            return blocks
        out = dict(blocks)
        for target in on:
            # Held keys of the prompt form a prefix of it: the shared depth is found by bisection.
            held, lo, hi = self.held[target], 1, len(keys)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if keys[mid - 1] in held:
                    lo = mid
                else:
                    hi = mid - 1
            name = target if per_rank else target[0]
            out[name] = max(0.0, out.get(name, 0.0) - share * lo)
        return out

    def forget(self, worker: str) -> None:
        self.inflight.pop(worker, None)
        self.active_blocks.pop(worker, None)
        self.contexts.pop(worker, None)
        self.blended.pop(worker, None)
        self.ranks.pop(worker, None)
        for by_rank in (self.rank_blocks, self.rank_contexts, self.rank_blended, self.held):
            for key in [k for k in by_rank if k[0] == worker]:
                del by_rank[key]
        for first, on in list(self.starts.items()):
            for target in [t for t in on if t[0] == worker]:
                del on[target]
            if not on:
                del self.starts[first]


class Pick(NamedTuple):
    worker: str
    #: Prompt blocks the policy expects to find cached there.
    overlap: int = 0
    #: The data-parallel rank to run on; None lets the instance choose.
    rank: int | None = None
    #: The prompt's block keys, where the policy computed them (the load counts them once each).
    keys: Sequence[int] = ()


class Policy:
    #: Reads the KV events workers relay (the frontend subscribes only for such policies).
    uses_kv_events = False
    #: Keeps a block index (the frontend tunes the garbage collector for it).
    keeps_index = False
    index: KvIndex | None = None

    def choose(
        self, candidates: Sequence[str], tokens: Sequence[int], block_size: int, lora: str | None, load: Load
    ) -> Pick:
        """The instance (and, for policies that see ranks, the rank) for a request."""
        raise NotImplementedError

    def on_kv_events(self, batch: KvEventBatch) -> None:
        pass

    def forget(self, worker_id: str) -> None:
        pass

    # ---- several frontends (see `dynvllm.router.replicas` and `dynvllm.router.snapshot`) ----
    def predict_for_peer(self, worker: Worker, keys: list[int], now: float) -> float | None:
        """A peer frontend sent `keys` to `worker`: count them as cached there as if this frontend
        had (the expiry used), or None for a policy that predicts nothing."""
        return None

    def retract(self, worker: Worker, keys: list[int], expiry: float) -> None:
        pass

    def snapshot(self) -> Iterator[Part] | None:
        """(worker, last relay sequence applied, block keys[, offload tier]) for a starting peer;
        None: no index worth sending."""
        return None

    def restore(self, snapshot: Snapshot | None, buffered: list[KvEventBatch]) -> Iterator[None]:
        """Start from a peer's snapshot (None: cold), then the events buffered meanwhile. A
        generator that pauses between workers: a frontend loading millions of blocks keeps its
        event loop (discovery heartbeats) turning. `buffered` may grow while it pauses: the
        last step applies it without pausing, so nothing arriving meanwhile is missed."""
        yield from ()
        for batch in buffered:
            self.on_kv_events(batch)


class RoundRobin(Policy):
    def __init__(self, settings: Settings | None = None) -> None:
        self._n = itertools.count()

    def choose(
        self, candidates: Sequence[str], tokens: Sequence[int], block_size: int, lora: str | None, load: Load
    ) -> Pick:
        return Pick(sorted(candidates)[next(self._n) % len(candidates)])


class Random(Policy):
    def __init__(self, settings: Settings | None = None, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(
        self, candidates: Sequence[str], tokens: Sequence[int], block_size: int, lora: str | None, load: Load
    ) -> Pick:
        return Pick(self._rng.choice(list(candidates)))


class LeastLoaded(Policy):
    """Fewest in-flight requests; ties rotate so equal workers share the load."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._n = itertools.count()

    def choose(
        self, candidates: Sequence[str], tokens: Sequence[int], block_size: int, lora: str | None, load: Load
    ) -> Pick:
        inflight = load.inflight
        low = min(inflight.get(c, 0.0) for c in candidates)
        best = sorted(c for c in candidates if inflight.get(c, 0.0) == low)
        return Pick(best[next(self._n) % len(best)])


class KvRouting(Policy):
    """Cached prefix from the engines' KV events, balanced against active blocks."""

    uses_kv_events = True
    keeps_index = True
    index: KvIndex

    def __init__(self, settings: Settings) -> None:
        self.settings = router = settings.router
        self.index = KvIndex()
        self.cost = KvPolicy(
            self.index,
            router.router_prefill_weight,
            router.router_temperature,
            cpu_cost=router.router_cpu_load_cost,
            disk_cost=router.router_disk_load_cost,
        )
        self._fallback = LeastLoaded()
        self._relay_seq: dict[tuple[str, int], int] = {}
        self.gaps = 0

    def choose(
        self, candidates: Sequence[str], tokens: Sequence[int], block_size: int, lora: str | None, load: Load
    ) -> Pick:
        if block_size <= 0:
            return self._fallback.choose(candidates, tokens, block_size, lora, load)
        return self.choose_keys(candidates, hashing.chain(tokens, block_size, lora), load)

    def choose_keys(self, candidates: Sequence[str], keys: list[int], load: Load) -> Pick:
        """`choose` for a prompt keyed already (one with images: see `image_keys`)."""
        index, ttl = self.index, self._predict_ttl()
        if ttl > 0:
            index.expire()
        decision = self._decide(candidates, keys, load, ttl > 0)
        if ttl > 0:
            # The prompt is on its way to that worker: requests sharing its prefix that arrive
            # before the worker's events (its prefill still running) should follow it there.
            index.predict(decision.worker, keys, ttl)
        iid, rank = decision.worker
        return Pick(iid, decision.overlap_blocks, rank if iid in load.ranks else None, keys)

    def _predict_ttl(self) -> float:
        return self.settings.router_predict_ttl

    def _decide(self, candidates: Sequence[str], keys: list[int], load: Load, predicted: bool) -> Decision:
        """`predicted`: the blocks of requests in flight count as cached where they went (until
        events say so), so a request sharing them shares them there (see `Load.others`)."""
        ranks = load.ranks
        if not ranks:
            return self.cost.choose([(c, 0) for c in candidates], keys, load.load(keys, False, predicted))
        # Data-parallel instances: each rank has its own KV cache and queue, so each is a target.
        targets: list[Worker] = []
        for c in candidates:
            first, count = ranks.get(c, (0, 1))
            targets.extend((c, r) for r in range(first, first + count))
        return self.cost.choose(targets, keys, load.load(keys, True, predicted), per_rank=True)

    def on_kv_events(self, batch: KvEventBatch) -> None:
        """Apply relayed engine events; a gap in a rank's relay sequence drops that rank's state."""
        worker = (batch.instance_id, batch.dp_rank)
        last = self._relay_seq.get(worker)
        if last is not None and batch.seq != last + 1:
            self.gaps += 1
            self.index.drop_worker(worker)
        self._relay_seq[worker] = batch.seq
        for ev in batch.events:
            self.index.apply(worker, ev)

    def forget(self, worker_id: str) -> None:
        for worker in [w for w in self._relay_seq if w[0] == worker_id]:
            del self._relay_seq[worker]
        self.index.drop_instance(worker_id)

    def predict_for_peer(self, worker: Worker, keys: list[int], now: float) -> float | None:
        ttl = self._predict_ttl()
        if ttl <= 0:
            return None
        self.index.predict(worker, keys, ttl, now)
        return now + ttl

    def retract(self, worker: Worker, keys: list[int], expiry: float) -> None:
        self.index.retract(worker, keys, expiry)

    def snapshot(self) -> Iterator[Part] | None:
        if not self.uses_kv_events:
            return None
        return self._snapshot()

    def _snapshot(self) -> Iterator[Part]:
        # A worker's keys and its sequence are read together (no suspension between them), so
        # each worker's part is consistent even if the caller lets events in between workers.
        named = set()
        for worker, keys in self.index.confirmed():
            named.add(worker)
            yield worker, self._relay_seq.get(worker, 0), keys
        for worker, seq in list(self._relay_seq.items()):
            if worker not in named:  # holds nothing now: its sequence still orders the cut-over
                yield worker, seq, []
        for tier, worker, keys in self.index.confirmed_lower():
            yield worker, self._relay_seq.get(worker, 0), keys, tier

    def restore(self, snapshot: Snapshot | None, buffered: list[KvEventBatch]) -> Iterator[None]:
        if snapshot is not None and self.uses_kv_events:
            for worker, (seq, keys) in snapshot.workers.items():
                self.index.store(worker, keys)
                self._relay_seq[worker] = seq
                yield
            for (tier, worker), keys in snapshot.lower.items():
                self.index.store(worker, keys, tier)
                yield
            buffered = cut_over(snapshot, buffered)
        for batch in buffered:
            self.on_kv_events(batch)


class KvApprox(KvRouting):
    """No events: predicts that a routed prefix stays cached on its worker for a while."""

    uses_kv_events = False

    def _predict_ttl(self) -> float:
        return self.settings.router_approx_ttl

    def on_kv_events(self, batch: KvEventBatch) -> None:
        pass  # predictions only: real events would mix two sources of truth


def make_policy(settings: Settings | RouterSettings) -> Policy:
    """The policy `--router` names (a factory taking the whole Settings)."""
    if isinstance(settings, RouterSettings):
        settings = Settings(router=settings)
    try:
        factory = registry.load(registry.ROUTER_POLICIES, settings.router.router)
    except registry.PluginError as exc:
        raise ValueError(str(exc)) from None
    return factory(settings)
