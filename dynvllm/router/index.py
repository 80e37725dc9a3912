"""Which worker holds which KV blocks (pure logic, single-threaded).

Blocks are keyed by the router's own chain hashes (see `hashing`), which workers compute from
their engine's events before relaying them (`block_keys`). `kv-approx` inserts predicted blocks
with an expiry instead of learning from events.

A block's holders are a bit mask of small worker ids (an int): a lookup walks the prompt's keys
with one AND per block however many workers share the prefix, and only workers that drop out
are ever named one by one.

Blocks in an offload tier (CPU, disk: see `tiers`) live in a child index per tier that shares the
worker numbering. The GPU walk notes where each group of workers stops; a worker can only go on
through a lower tier from there (the block it stopped at is not on its GPU), so the tiers cost a
probe per such place, and a walk only for the workers that do go on (`lookup`). Each tier counts
per worker the blocks it holds there and not on its GPU: while they are copies only, nobody can go
on and the tiers cost nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterator
from itertools import compress, islice, repeat
from operator import is_not

from dynvllm.router.tiers import CPU, DISK, GPU

Worker = tuple[str, int]  # (instance id, data-parallel rank)
_EVENT_BACKED = float("inf")  # expiry of blocks known from events (predictions expire)
_NOBODY: Worker = ("", -1)  # the name of a released worker id until it is given out again
_FEW = 8  # workers going on below: walked one by one up to this many, as one sweep of masks above


def tune_gc() -> None:
    """Make full garbage collections rare in a process that holds a large index.

    The index is a few large dicts per worker and tier and millions of ints; with CPython's
    default thresholds an oldest-generation pass walks every tracked object every few thousand
    allocations and stalls routing decisions for milliseconds. Nothing in it forms reference cycles.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


def _members(mask: int) -> list[int]:
    """The worker ids in `mask` (highest first): a bit at a time, which beats any conversion of
    the whole mask for the few to hundreds of workers a lookup names."""
    out = []
    while mask:
        w = mask.bit_length() - 1
        out.append(w)
        mask ^= 1 << w
    return out


class KvIndex:
    def __init__(self) -> None:
        # Workers are small ints inside the index, and sets of them bit masks.
        self._ids: dict[Worker, int] = {}
        self._workers: list[Worker] = []
        self._free: list[int] = []  # ids of workers gone for good, given out again first
        #: key -> the bit mask of the workers holding it (never 0: a key nobody holds is deleted).
        self.holders: dict[int, int] = {}
        self._keys_of: dict[int, dict[int, float]] = defaultdict(dict)  # key -> expiry (inf: event-backed)
        self._predicted: deque[tuple[float, int, list[int]]] = deque()  # in expiry order (one ttl)
        #: tier -> its blocks (children share the worker ids; they hold no predictions).
        self.lower: dict[int, KvIndex] = {}
        self._top: KvIndex | None = None  # a child's GPU index
        #: In a lower tier: per worker, how many blocks it holds here and not on its GPU, and the
        #: mask of workers with any. Only they can go on below where their GPU prefix ends, so
        #: while lower tiers hold copies of GPU blocks only, a lookup costs what a GPU-only one does.
        self._deep: dict[int, int] = {}
        self._deep_mask = 0

    def _tier(self, tier: int) -> KvIndex:
        child = self.lower.get(tier)
        if child is None:
            child = self.lower[tier] = KvIndex()
            child._ids, child._workers, child._free = self._ids, self._workers, self._free
            child._top = self
        return child

    def _id(self, worker: Worker) -> int:
        wid = self._ids.get(worker)
        if wid is None:
            if self._free:  # reuse: masks stay as wide as the workers alive, not all ever seen
                wid = self._free.pop()
                self._workers[wid] = worker
            else:
                wid = len(self._workers)
                self._workers.append(worker)
            self._ids[worker] = wid
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
                for child in self.lower.values():  # all its blocks below, now
                    child._deeper(known, len(child._keys_of.get(known, ())) - child._deep.get(known, 0))

    def _deeper(self, wid: int, n: int) -> None:
        left = self._deep.get(wid, 0) + n
        if left > 0:
            self._deep[wid] = left
            self._deep_mask |= 1 << wid
        else:
            self._deep.pop(wid, None)
            self._deep_mask &= ~(1 << wid)

    def _back_on_gpu(self, wid: int, keys: list[int]) -> None:
        """`keys` are going onto the worker's GPU: those it held only below no longer are."""
        holders, bit = self.holders, 1 << wid
        for child in self.lower.values():
            if wid in child._deep:
                back = 0
                for key in child._keys_of[wid].keys() & keys:
                    if not holders.get(key, 0) & bit:
                        back += 1
                if back:
                    child._deeper(wid, -back)

    def _store(self, wid: int, keys: list[int]) -> None:
        # The hot path of ingest (a million blocks a second at scale): every key goes in through
        # C-level calls (setdefault over the keys), and Python steps only through the keys that
        # others already held (setdefault handed back their mask, not this call's `bit`).
        mine = self._keys_of[wid]
        top = self._top
        if top is not None:  # a lower tier: blocks new here and not on the GPU are held only here
            on_gpu = top._keys_of.get(wid)
            fresh = set(keys).difference(on_gpu) if on_gpu else set(keys)  # offloads: mostly none
            if fresh and mine:
                fresh = fresh.difference(mine)
            if fresh:
                self._deeper(wid, len(fresh))
        elif self.lower:
            self._back_on_gpu(wid, keys)
        mine.update(dict.fromkeys(keys, _EVENT_BACKED))
        holders = self.holders
        bit = 1 << wid
        haves = list(map(holders.setdefault, keys, repeat(bit)))
        for key, have in compress(zip(keys, haves, strict=True), map(is_not, haves, repeat(bit))):
            if not have & bit:
                holders[key] = have | bit

    def _hold(self, wid: int, key: int) -> None:
        bit = 1 << wid
        have = self.holders.get(key)
        if have is None:
            self.holders[key] = bit
        elif not have & bit:
            self.holders[key] = have | bit

    def _unhold(self, wid: int, key: int) -> None:
        have = self.holders.get(key)
        bit = 1 << wid
        if have is not None and have & bit:
            if have == bit:
                del self.holders[key]
            else:
                self.holders[key] = have ^ bit

    def _discard(self, wid: int, key: int) -> None:
        mine = self._keys_of.get(wid)
        self._unhold(wid, key)
        if mine is None or mine.pop(key, None) is None:
            return
        top = self._top
        if top is None:  # gone from the GPU: copies below are now the only ones
            for child in self.lower.values():
                if key in child._keys_of.get(wid, ()):
                    child._deeper(wid, 1)
        elif key not in top._keys_of.get(wid, ()):  # a block held only here went
            self._deeper(wid, -1)

    def drop_worker(self, worker: Worker) -> None:
        wid = self._ids.get(worker)
        if wid is None:
            return
        for key in list(self._keys_of.pop(wid, {})):
            self._unhold(wid, key)
        for child in self.lower.values():
            for key in list(child._keys_of.pop(wid, {})):
                child._unhold(wid, key)
            child._deeper(wid, -child._deep.get(wid, 0))

    def drop_instance(self, instance_id: str) -> None:
        """The instance is gone: its blocks, and its workers' ids (given out again later)."""
        for w in [w for w in self._ids if w[0] == instance_id]:
            self.drop_worker(w)
            wid = self._ids.pop(w)
            self._workers[wid] = _NOBODY
            self._free.append(wid)

    # ---- predictions (kv-approx, and routed prompts not yet confirmed by events) --
    def predict(self, worker: Worker, keys: list[int], ttl: float, now: float | None = None) -> None:
        """Count `keys` as held by `worker` until `ttl` seconds from now, unless an event confirms
        them first (confirmed blocks never expire)."""
        expiry = (now if now is not None else time.monotonic()) + ttl
        wid = self._id(worker)
        if self.lower:
            self._back_on_gpu(wid, keys)
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
        return self._named(self._stops(keys))

    def lookup(self, keys: list[int]) -> tuple[dict[Worker, int], dict[Worker, tuple[int, int, int]]]:
        """`overlaps`, and for the workers whose prefix goes on through an offload tier how many
        leading blocks of `keys` they hold (g) on the GPU, (c) on the GPU or in CPU memory, (u)
        anywhere (g <= c <= u, u > g; blocks [g, c) load from the CPU, [c, u) from disk)."""
        stops = self._stops(keys)
        gpu = self._named(stops)
        if not self.lower or not keys:
            return gpu, {}
        return gpu, self._further(keys, stops)

    def tiered(self, keys: list[int]) -> dict[Worker, tuple[int, int, int]] | None:
        """(g, c, u) as `lookup` says, for every worker holding a prefix of `keys` anywhere; None
        while no lower tier holds anything: `overlaps` says it all."""
        if not any(child.holders for child in self.lower.values()):
            return None
        gpu, further = self.lookup(keys)
        out = {w: (d, d, d) for w, d in gpu.items()}
        out.update(further)
        return out

    def _stops(self, keys: list[int]) -> list[tuple[int, int]]:
        """(mask, depth): the workers whose GPU prefix of `keys` ends at that depth, by depth."""
        holders = self.holders
        active = holders.get(keys[0]) if keys else None
        if active is None:
            return []
        stops = []
        depth = 1
        for key in islice(keys, 1, None):
            have = holders.get(key)
            if have is None:
                break
            still = active & have
            if still != active:
                if not still:
                    break
                stops.append((active ^ still, depth))
                active = still
            depth += 1
        stops.append((active, depth))
        return stops

    def _named(self, stops: list[tuple[int, int]]) -> dict[Worker, int]:
        """{worker: depth} from (mask, depth) groups."""
        workers = self._workers
        out: dict[Worker, int] = {}
        for mask, depth in stops:
            while mask:
                w = mask.bit_length() - 1
                out[workers[w]] = depth
                mask ^= 1 << w
        return out

    def _further(self, keys: list[int], stops: list[tuple[int, int]]) -> dict[Worker, tuple[int, int, int]]:
        """Workers that go on through a lower tier from where their GPU prefix ends: a worker
        stopped at a block that is not on its GPU, so a tier holding that block for it is the
        only way on. A probe per place where workers stopped, then a walk for those that go on: each
        through its own blocks when they are few, one sweep of masks for many."""
        deep = 0
        for child in self.lower.values():
            deep |= child._deep_mask
        if not deep:
            return {}
        cpu_tier, disk_tier = self.lower.get(CPU), self.lower.get(DISK)
        cpu = cpu_tier.holders if cpu_tier is not None else {}
        disk = disk_tier.holders if disk_tier is not None else {}
        n = len(keys)
        begin: dict[int, int] = {}  # depth -> the workers that may go on from there
        for mask, depth in stops:
            if depth < n and mask & deep:
                key = keys[depth]
                go = (cpu.get(key, 0) | disk.get(key, 0)) & mask
                if go:
                    begin[depth] = go
        on_gpu = self.holders.get(keys[0], 0)  # = every group of `stops` together
        if deep & ~on_gpu:  # workers holding the first block in a lower tier only
            key = keys[0]
            fresh = (cpu.get(key, 0) | disk.get(key, 0)) & deep & ~on_gpu
            if fresh:
                begin[0] = fresh
        if not begin:
            return {}
        if sum(mask.bit_count() for mask in begin.values()) <= _FEW:
            return self._walk_each(keys, begin)
        gpu = self.holders
        # One sweep from the first start: `on_c` go on through GPU or CPU (c), `on_u` left that at
        # their c and go on through the disk too (u), checked from the block they stopped at.
        starts = sorted(begin)
        c_stops: list[tuple[int, int]] = []
        u_stops: list[tuple[int, int]] = []
        on_c = on_u = 0
        i, depth = 0, starts[0]
        while depth < n:
            if i < len(starts) and starts[i] == depth:
                on_c |= begin[depth]
                i += 1
            if not (on_c or on_u):
                if i == len(starts):
                    break
                depth = starts[i]
                continue
            key = keys[depth]
            held = gpu.get(key, 0) | cpu.get(key, 0)
            out = on_c & ~held
            if out:
                c_stops.append((out, depth))
                on_c ^= out
                on_u |= out
            if on_u:
                out = on_u & ~(held | disk.get(key, 0))
                if out:
                    u_stops.append((out, depth))
                    on_u ^= out
            depth += 1
        if on_c:
            c_stops.append((on_c, depth))
            u_stops.append((on_c, depth))
        if on_u:
            u_stops.append((on_u, depth))
        g_of = {w: d for d, mask in begin.items() for w in _members(mask)}
        c_of = {w: d for mask, d in c_stops for w in _members(mask)}
        workers = self._workers
        return {workers[w]: (g_of[w], c_of[w], d) for mask, d in u_stops for w in _members(mask)}

    def _walk_each(self, keys: list[int], begin: dict[int, int]) -> dict[Worker, tuple[int, int, int]]:
        """The sweep for a few workers: each through its own blocks per tier (small dicts), no
        masks as wide as all workers."""
        empty: dict[int, float] = {}
        lower = self.lower
        cpu_tier, disk_tier = lower.get(CPU), lower.get(DISK)
        n = len(keys)
        out = {}
        for g, mask in begin.items():
            for w in _members(mask):
                on_gpu = self._keys_of.get(w, empty)
                on_cpu = cpu_tier._keys_of.get(w, empty) if cpu_tier is not None else empty
                on_disk = disk_tier._keys_of.get(w, empty) if disk_tier is not None else empty
                d = g
                while d < n and (keys[d] in on_gpu or keys[d] in on_cpu):
                    d += 1
                c = d
                while d < n and (keys[d] in on_gpu or keys[d] in on_cpu or keys[d] in on_disk):
                    d += 1
                out[self._workers[w]] = (g, c, d)
        return out

    def block_count(self) -> int:
        """Blocks on the workers' GPUs (offload tiers: `tier_block_count`)."""
        return sum(len(k) for k in self._keys_of.values())

    def tier_block_count(self, tier: int) -> int:
        return self.block_count() if tier == GPU else sum(len(k) for k in self._tier(tier)._keys_of.values())
