"""Which worker holds which KV blocks (pure logic, single-threaded).

Blocks are keyed by the router's own chain hashes (see `hashing`), which workers compute from
their engine's events before relaying them (`block_keys`). `kv-approx` inserts predicted blocks
with an expiry instead of learning from events.

Blocks in an offload tier (CPU, disk: see `tiers`) live in a child index per tier that shares the
worker numbering: the GPU index and its lookups stay exactly as fast as without tiers, and only
a lookup while some lower tier holds blocks walks the tiers too (`tiered`).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterator

from dynvllm.router.tiers import CPU, DISK, GPU

Worker = tuple[str, int]  # (instance id, data-parallel rank)
_EVENT_BACKED = float("inf")  # expiry of blocks known from events (predictions expire)


def tune_gc() -> None:
    """Make full garbage collections rare in a process that holds a large index.

    The index is millions of long-lived sets and dicts; with CPython's default thresholds an
    oldest-generation pass walks all of them every few thousand allocations and stalls routing
    decisions for milliseconds. Nothing in it forms reference cycles.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


class KvIndex:
    def __init__(self) -> None:
        # Workers are small ints inside the index: set operations on ints skip the tuple hashing
        # that dominates a lookup over a prefix many workers share.
        self._ids: dict[Worker, int] = {}
        self._workers: list[Worker] = []
        #: key -> its holder's id, or a set of ids when several hold it: most blocks live on one
        #: worker, and an int per key instead of a set saves memory and time at a million blocks.
        self.holders: dict[int, int | set[int]] = {}
        self._keys_of: dict[int, dict[int, float]] = defaultdict(dict)  # key -> expiry (inf: event-backed)
        self._predicted: deque[tuple[float, int, list[int]]] = deque()  # in expiry order (one ttl)
        #: tier -> its blocks (children share `_ids` and `_workers`; they hold no predictions).
        self.lower: dict[int, KvIndex] = {}

    def _tier(self, tier: int) -> KvIndex:
        child = self.lower.get(tier)
        if child is None:
            child = self.lower[tier] = KvIndex()
            child._ids, child._workers = self._ids, self._workers
        return child

    def _id(self, worker: Worker) -> int:
        wid = self._ids.get(worker)
        if wid is None:
            wid = self._ids[worker] = len(self._workers)
            self._workers.append(worker)
        return wid

    # ---- events ---------------------------------------------------------------
    def apply(self, worker: Worker, event: tuple | list) -> None:
        """One router event, as workers relay them (see `block_keys`)."""
        kind = event[0]
        if kind == "stored":
            target = self._tier(event[2]) if len(event) > 2 and event[2] != GPU else self
            target._store(self._id(worker), event[1])
        elif kind == "removed":
            target = self._tier(event[2]) if len(event) > 2 and event[2] != GPU else self
            wid = self._id(worker)
            for key in event[1]:
                target._discard(wid, key)
        elif kind == "cleared":  # the engine's prefix cache was reset; offload tiers keep theirs
            known = self._ids.get(worker)
            if known is not None:
                for key in list(self._keys_of.pop(known, {})):
                    self._unhold(known, key)

    def _store(self, wid: int, keys: list[int]) -> None:
        # The hot path of ingest (a million blocks a second at scale). All keys go in with C-level
        # set and dict operations; Python steps only through keys that others already hold.
        self._keys_of[wid].update(dict.fromkeys(keys, _EVENT_BACKED))
        holders = self.holders
        before = {key: holders[key] for key in holders.keys() & keys}
        holders.update(dict.fromkeys(keys, wid))
        for key, have in before.items():
            if isinstance(have, int):
                if have != wid:
                    holders[key] = {have, wid}
            else:
                have.add(wid)
                holders[key] = have

    def _hold(self, wid: int, key: int) -> None:
        have = self.holders.get(key)
        if have is None:
            self.holders[key] = wid
        elif isinstance(have, int):
            if have != wid:
                self.holders[key] = {have, wid}
        else:
            have.add(wid)

    def _unhold(self, wid: int, key: int) -> None:
        have = self.holders.get(key)
        if have is None:
            return
        if isinstance(have, int):
            if have == wid:
                del self.holders[key]
            return
        have.discard(wid)
        if len(have) == 1:
            self.holders[key] = next(iter(have))
        elif not have:
            del self.holders[key]

    def _discard(self, wid: int, key: int) -> None:
        self._keys_of[wid].pop(key, None)
        self._unhold(wid, key)

    def drop_worker(self, worker: Worker) -> None:
        wid = self._ids.get(worker)
        if wid is None:
            return
        for key in list(self._keys_of.pop(wid, {})):
            self._unhold(wid, key)
        for child in self.lower.values():
            for key in list(child._keys_of.pop(wid, {})):
                child._unhold(wid, key)

    def drop_instance(self, instance_id: str) -> None:
        for w in [w for w in self._ids if w[0] == instance_id]:
            self.drop_worker(w)

    # ---- predictions (kv-approx, and routed prompts not yet confirmed by events) --
    def predict(self, worker: Worker, keys: list[int], ttl: float, now: float | None = None) -> None:
        """Count `keys` as held by `worker` until `ttl` seconds from now, unless an event confirms
        them first (confirmed blocks never expire)."""
        expiry = (now if now is not None else time.monotonic()) + ttl
        wid = self._id(worker)
        mine = self._keys_of[wid]
        for key in keys:
            if mine.get(key, 0.0) < expiry:
                mine[key] = expiry
            self._hold(wid, key)
        self._predicted.append((expiry, wid, keys))

    def expire(self, now: float | None = None) -> None:
        """Forget predictions whose time is up. Work in proportion to what expires: predictions
        are kept in the order they end, so no pass over the whole index is needed."""
        now = now if now is not None else time.monotonic()
        queue = self._predicted
        while queue and queue[0][0] <= now:
            expiry, wid, keys = queue.popleft()
            mine = self._keys_of.get(wid)
            if mine is None:
                continue
            for key in keys:
                if mine.get(key) == expiry:  # not refreshed by a later prediction, not confirmed
                    self._discard(wid, key)

    def retract(self, worker: Worker, keys: list[int], expiry: float) -> None:
        """Withdraw a prediction made with this `expiry` (a peer frontend's, when that peer goes):
        keys that a later prediction refreshed or an event confirmed stay."""
        wid = self._ids.get(worker)
        if wid is None or (mine := self._keys_of.get(wid)) is None:
            return
        for key in keys:
            if mine.get(key) == expiry:
                self._discard(wid, key)

    # ---- snapshots (a starting frontend loads a live peer's index) ---------------
    def confirmed(self) -> Iterator[tuple[Worker, list[int]]]:
        """Each worker's blocks known from events. Predictions are left out: they expire within
        seconds, and the peers' decisions that made them reach the new frontend as they come."""
        inf = _EVENT_BACKED
        for wid, mine in list(self._keys_of.items()):
            yield self._workers[wid], [k for k, e in mine.items() if e == inf]

    def store(self, worker: Worker, keys: list[int], tier: int = GPU) -> None:
        """Blocks a worker holds, as a snapshot says (the bulk path of `apply`)."""
        (self if tier == GPU else self._tier(tier))._store(self._id(worker), keys)

    def confirmed_lower(self) -> Iterator[tuple[int, Worker, list[int]]]:
        """(tier, worker, keys) for blocks in offload tiers (events only ever put them there)."""
        for tier, child in list(self.lower.items()):
            for wid, mine in list(child._keys_of.items()):
                if mine:
                    yield tier, self._workers[wid], list(mine)

    # ---- queries ---------------------------------------------------------------
    def overlaps(self, keys: list[int]) -> dict[Worker, int]:
        """For each worker, how many leading blocks of `keys` it holds."""
        workers = self._workers
        return {workers[w]: d for w, d in self._depths(keys).items()}

    def _depths(self, keys: list[int]) -> dict[int, int]:
        if not keys:
            return {}
        holders = self.holders
        first = holders.get(keys[0])
        if first is None:
            return {}
        # Set operations run in C; Python only touches a worker when it drops out of the prefix.
        depth_of: dict[int, int] = {}
        active = {first} if isinstance(first, int) else set(first)
        depth = 1
        for key in keys[1:]:
            have = holders.get(key)
            if have is None:
                break
            if not isinstance(have, int):
                # Caches keep prefixes whole, so a block's holders are usually a subset of its
                # parent's: then the set is taken as it is (read only here), not copied.
                still = have if have <= active else active & have
            elif have in active:
                still = {have}
            else:
                break
            if not still:
                break
            if len(still) != len(active):
                for w in active - still:
                    depth_of[w] = depth
            active = still
            depth += 1
        for w in active:
            depth_of[w] = depth
        return depth_of

    def tiered(self, keys: list[int]) -> dict[Worker, tuple[int, int, int]] | None:
        """For each worker, how many leading blocks of `keys` it holds (g) on the GPU, (c) on
        the GPU or in CPU memory, (u) anywhere (c <= u; blocks [g, c) load from the CPU,
        [c, u) from disk). None while no lower tier holds anything: `overlaps` says it all."""
        cpu, disk = self.lower.get(CPU), self.lower.get(DISK)
        cpu_h = cpu.holders if cpu is not None and cpu.holders else None
        disk_h = disk.holders if disk is not None and disk.holders else None
        if cpu_h is None and disk_h is None:
            return None
        g = self._depths(keys)
        maps = [self.holders]
        c = g
        if cpu_h is not None:
            maps.append(cpu_h)
            c = _extend(keys, g, maps, cpu_h)
        u = c
        if disk_h is not None:
            maps.append(disk_h)
            u = _extend(keys, c, maps, disk_h)
        workers = self._workers
        return {workers[w]: (g.get(w, 0), c.get(w, 0), d) for w, d in u.items()}

    def block_count(self) -> int:
        """Blocks on the workers' GPUs (offload tiers: `tier_block_count`)."""
        return sum(len(k) for k in self._keys_of.values())

    def tier_block_count(self, tier: int) -> int:
        return self.block_count() if tier == GPU else sum(len(k) for k in self._tier(tier)._keys_of.values())


def _extend(
    keys: list[int],
    depths: dict[int, int],
    maps: list[dict[int, int | set[int]]],
    new: dict[int, int | set[int]],
) -> dict[int, int]:
    """Each worker's depth through the union of `maps`, from its depth through all but the last
    (`new`, the tier just added): a worker goes further only where `new` holds the block it
    stopped at, so the walk starts there, for those workers alone. Most lookups end with a few
    dict probes; no union of holder sets is built for the blocks before."""
    n = len(keys)
    # The blocks where some worker stopped (and the first): does the new tier hold any of them?
    live = {d for d in {0, *depths.values()} if d < n and keys[d] in new}
    if not live:
        return depths
    out = dict(depths)
    stopped: dict[int, set[int]] = {}
    for w, d in depths.items():
        if d in live:
            stopped.setdefault(d, set()).add(w)
    first = new.get(keys[0]) if 0 in live else None
    if first is not None:  # workers holding nothing of the prompt before this tier
        fresh = ({first} if isinstance(first, int) else set(first)) - depths.keys()
        if fresh:
            stopped.setdefault(0, set()).update(fresh)
    for d in sorted(stopped):
        here = new.get(keys[d])
        if here is None:
            continue
        active = stopped[d] & ({here} if isinstance(here, int) else here)
        # Workers that went on from an earlier start may have joined this group: skip them.
        active = {w for w in active if out.get(w, 0) == d}
        depth = d + 1
        while active and depth < n:
            key = keys[depth]
            have: set[int] = set()
            for m in maps:
                h = m.get(key)
                if h is None:
                    continue
                if isinstance(h, int):
                    if h in active:
                        have.add(h)
                else:
                    have |= active & h
            if len(have) != len(active):
                for w in active - have:
                    out[w] = depth
            active = have
            depth += 1
        for w in active:
            out[w] = depth
    return out
