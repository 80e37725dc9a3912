"""Which worker holds which KV blocks (pure logic, single-threaded).

Blocks are keyed by the router's own chain hashes (see `hashing`), which workers compute from
their engine's events before relaying them (`block_keys`). `kv-approx` inserts predicted blocks
with an expiry instead of learning from events.

A block's holders are a bit mask of small worker ids (an int): a lookup walks the prompt's keys
with one AND per block however many workers share the prefix, and only workers that drop out
are ever named one by one. The masks are the whole truth of who holds what on the GPU. They live
in a holders table (`masks`: compiled, or a dict where it was not built) that takes an event's or
a prompt's keys in one call, so ingest (millions of blocks a second at scale) and lookups do no
Python-level step per block. A worker's own blocks, needed only to forget it or snapshot it, are
the event lists it was stored with, kept as they came (`key_log`), not a per-block record.

Blocks in an offload tier (CPU, disk) live in a child index per tier (`tiers.TierBlocks`) that
shares the worker numbering. The GPU walk notes where each group of workers stops; a worker can
only go on through a lower tier from there (the block it stopped at is not on its GPU), so the
tiers cost a probe per such place, and a walk only for the workers that do go on (`lookup`). Each
tier keeps per worker the blocks it holds there and not on its GPU: while they are copies only,
nobody can go on and the tiers cost nothing. A tier's stores, like the GPU's, are kept as their
event lists (`KeyLog`), not as per-worker sets.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain

from dynvllm.router import masks
from dynvllm.router.key_log import KeyLog
from dynvllm.router.masks import members
from dynvllm.router.tiers import CPU, DISK, GPU, TierBlocks

log = logging.getLogger("dynvllm.router")
_told: set[str] = set()  # implementations logged already (once per process)

Worker = tuple[str, int]  # (instance id, data-parallel rank)
_NOBODY: Worker = ("", -1)  # the name of a released worker id until it is given out again
_FEW = 8  # workers going on below: walked one by one up to this many, as one sweep of masks above


def tune_gc() -> None:
    """Make full garbage collections rare in a process that holds a large index.

    The index is a few large dicts per worker and tier and millions of ints; with CPython's
    default thresholds an oldest-generation pass walks every tracked object every few thousand
    allocations and stalls routing decisions for milliseconds. Nothing in it forms reference cycles.
    """
    import gc

    from dynvllm import heap

    heap.freeze()
    gc.set_threshold(50_000, 50, 1000)


class KvIndex:
    """The GPU tier's blocks, and through `lower` the offload tiers' (`TierBlocks`)."""

    def __init__(self, impl: str | None = None) -> None:
        """`impl`: the holders table, "native" or "python" (`masks.implementation`)."""
        self.impl = masks.implementation(impl)
        self._table, self._walk = masks.kit(self.impl)
        if self.impl not in _told:
            _told.add(self.impl)
            if self.impl == "native":
                log.info("router index: compiled holders table (dynvllm.router._holders)")
            else:
                why = masks.NATIVE_MISSING or f"{masks.IMPL_ENV}=python"
                log.warning("router index: pure-Python holders table, slower ingest (%s)", why)
        # Workers are small ints inside the index, and sets of them bit masks.
        self._ids: dict[Worker, int] = {}
        self._workers: list[Worker] = []
        self._free: list[int] = []  # ids of workers gone for good, given out again first
        #: key -> the bit mask of the workers holding it (never 0: a key nobody holds is deleted).
        self.holders: masks.Table = self._table()
        #: Per worker: its event-backed GPU blocks (`KeyLog`), in the order workers first held any.
        self._logs: dict[int, KeyLog] = {}
        #: Per worker: blocks it holds by prediction only, key -> expiry (an event confirming a
        #: block takes it out: confirmed blocks never expire).
        self._pred: dict[int, dict[int, float]] = {}
        self._predicted: deque[tuple[float, int, list[int]]] = deque()  # in expiry order (one ttl)
        #: tier -> its blocks.
        self.lower: dict[int, TierBlocks] = {}

    def _tier(self, tier: int) -> TierBlocks:
        child = self.lower.get(tier)
        if child is None:
            child = self.lower[tier] = TierBlocks(self.holders, self._table)
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
        """One router event, as workers relay them (see `block_keys`). The index keeps the
        event's key list: it must not change afterwards (decoded events never do)."""
        kind = event[0]
        if kind == "stored":
            if len(event) > 2 and event[2] != GPU:
                # Offloads follow the GPU store of the same blocks: its keys need no probe.
                wid = self._id(worker)
                mine = self._logs.get(wid)
                last = mine.lists[-1] if mine is not None and mine.last_held else ()
                self._tier(event[2]).store(wid, event[1], last)
            else:
                self._store(self._id(worker), event[1])
        elif kind == "removed":
            if len(event) > 2 and event[2] != GPU:
                self._tier(event[2]).remove(self._id(worker), event[1])
            else:
                self._remove(self._id(worker), event[1])
        elif kind == "cleared":  # the engine's prefix cache was reset; offload tiers keep theirs
            known = self._ids.get(worker)
            if known is not None:
                self._forget(known)
                for child in self.lower.values():  # all its blocks below, now
                    child.all_off_gpu(known)

    def _store(self, wid: int, keys: list[int]) -> None:
        # The hot path of ingest: a worker's bit set in each key's mask (`set_bit`), a log append.
        if self.lower:
            self._back_on_gpu(wid, keys)
        pred = self._pred.get(wid)
        if pred:  # predictions these events confirm
            for key in pred.keys() & keys:
                del pred[key]
        self.holders.set_bit(wid, keys)
        mine = self._logs.get(wid)
        if mine is None:
            mine = self._logs[wid] = KeyLog()
        mine.add(keys)

    def _back_on_gpu(self, wid: int, keys: list[int]) -> None:
        """`keys` are going onto the worker's GPU: those it held only below no longer are."""
        for child in self.lower.values():
            child.back_on_gpu(wid, keys)

    def _remove(self, wid: int, keys: Iterable[int]) -> None:
        gone = self.holders.clear_bit(wid, keys)
        if not gone:
            return
        pred = self._pred.get(wid)
        logged = [key for key in gone if pred.pop(key, None) is None] if pred else gone
        mine = self._logs.get(wid)
        if mine is not None and logged:  # (predicted ones were never logged)
            mine.drop(logged)
        for child in self.lower.values():  # gone from the GPU: copies below are now the only ones
            child.off_gpu(wid, gone)

    def _forget(self, wid: int) -> None:
        """All the worker's GPU blocks, known from events or predicted."""
        logged, pred = self._logs.pop(wid, None), self._pred.pop(wid, None)
        for keys in chain(logged.lists if logged is not None else (), (pred or (),)):
            self.holders.clear_bit(wid, keys)

    def drop_worker(self, worker: Worker) -> None:
        wid = self._ids.get(worker)
        if wid is None:
            return
        self._forget(wid)
        for child in self.lower.values():
            child.forget(wid)

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
        if wid not in self._logs:
            self._logs[wid] = KeyLog()
        pred = self._pred.get(wid)
        if pred is None:
            pred = self._pred[wid] = {}
        fresh = self.holders.without_bit(wid, keys)
        if len(fresh) < len(keys):  # held already: if predicted before, that runs on (events: stay)
            for key in pred.keys() & set(keys).difference(fresh):
                if pred[key] < expiry:
                    pred[key] = expiry
        self.holders.set_bit(wid, fresh)
        pred.update(dict.fromkeys(fresh, expiry))
        self._predicted.append((expiry, wid, keys))

    def expire(self, now: float | None = None) -> None:
        """Forget predictions whose time is up. Work in proportion to what expires: predictions
        are kept in the order they end, so no pass over the whole index is needed."""
        now = now if now is not None else time.monotonic()
        queue = self._predicted
        while queue and queue[0][0] <= now:
            expiry, wid, keys = queue.popleft()
            pred = self._pred.get(wid)
            if pred:  # keys not refreshed by a later prediction, not confirmed
                self._remove(wid, [key for key in keys if pred.get(key) == expiry])

    def retract(self, worker: Worker, keys: list[int], expiry: float) -> None:
        """Withdraw a prediction made with this `expiry` (a peer frontend's, when that peer goes):
        keys that a later prediction refreshed or an event confirmed stay."""
        wid = self._ids.get(worker)
        if wid is None or not (pred := self._pred.get(wid)):
            return
        self._remove(wid, [key for key in keys if pred.get(key) == expiry])

    # ---- snapshots (a starting frontend loads a live peer's index) ---------------
    def confirmed(self) -> Iterator[tuple[Worker, list[int]]]:
        """Each worker's blocks known from events. Predictions are left out: they expire within
        seconds, and the peers' decisions that made them reach the new frontend as they come."""
        for wid, logged in list(self._logs.items()):
            if self._logs.get(wid) is not logged:  # forgotten while the caller was away
                continue
            held = logged.held()
            pred = self._pred.get(wid)
            yield self._workers[wid], [k for k in held if k not in pred] if pred else list(held)

    def store(self, worker: Worker, keys: Iterable[int], tier: int = GPU) -> None:
        """Blocks a worker holds, as a snapshot says (the bulk path of `apply`)."""
        keys = list(keys)
        if tier == GPU:
            self._store(self._id(worker), keys)
        else:
            self._tier(tier).store(self._id(worker), keys)

    def confirmed_lower(self) -> Iterator[tuple[int, Worker, list[int]]]:
        """(tier, worker, keys) for blocks in offload tiers (events only ever put them there)."""
        for tier, child in list(self.lower.items()):
            for wid in list(child.logs):
                if child.logs.get(wid) is not None and (mine := child.held(wid)):
                    yield tier, self._workers[wid], list(mine)

    # ---- queries ---------------------------------------------------------------
    def overlaps(self, keys: list[int]) -> dict[Worker, int]:
        """For each worker, how many leading blocks of `keys` it holds."""
        return self.holders.lookup(keys, self._workers)[0]

    def lookup(self, keys: list[int]) -> tuple[dict[Worker, int], dict[Worker, tuple[int, int, int]]]:
        """`overlaps`, and for the workers whose prefix goes on through an offload tier how many
        leading blocks of `keys` they hold (g) on the GPU, (c) on the GPU or in CPU memory, (u)
        anywhere (g <= c <= u, u > g; blocks [g, c) load from the CPU, [c, u) from disk)."""
        # A worker goes on through a tier only if the tier holds the block it stopped at, which is
        # not on its GPU: only workers holding blocks there and not on the GPU can, and each tier
        # is asked for its own such (deep) workers only, at each place where a group stopped.
        tiers: list[object] = []
        for tier in (CPU, DISK):
            child = self.lower.get(tier)
            if child is not None and child.deep_mask:
                tiers += (child.holders, child.deep_mask)
        gpu, begin = self.holders.lookup(keys, self._workers, *tiers)
        if not tiers or not keys:
            return gpu, {}
        return gpu, self._further(keys, begin)

    def tiered(self, keys: list[int]) -> dict[Worker, tuple[int, int, int]] | None:
        """(g, c, u) as `lookup` says, for every worker holding a prefix of `keys` anywhere; None
        while no lower tier holds anything: `overlaps` says it all."""
        if not any(child.holders for child in self.lower.values()):
            return None
        gpu, further = self.lookup(keys)
        out = {w: (d, d, d) for w, d in gpu.items()}
        out.update(further)
        return out

    def _further(self, keys: list[int], begin: dict[int, int]) -> dict[Worker, tuple[int, int, int]]:
        """Workers that go on through a lower tier from where their GPU prefix ends: a worker
        stopped at a block that is not on its GPU, so a tier holding that block for it is the
        only way on. `begin`: depth -> the workers that may go on from there (by depth), from
        a probe per place where workers stopped; then a walk for those that go on: each through
        its own blocks when they are few, one sweep of masks for many."""
        cpu_tier, disk_tier = self.lower.get(CPU), self.lower.get(DISK)
        cpu_deep = cpu_tier.deep_mask if cpu_tier is not None else 0
        disk_deep = disk_tier.deep_mask if disk_tier is not None else 0
        none: dict[int, int] = {}
        cpu: masks.Table | dict[int, int] = cpu_tier.holders if cpu_tier is not None else none
        disk: masks.Table | dict[int, int] = disk_tier.holders if disk_tier is not None else none
        n = len(keys)
        not_on_gpu = ~self.holders.get(keys[0], 0)  # = every group that stopped, together
        if (cpu_deep | disk_deep) & not_on_gpu:  # workers holding the first block below only
            key = keys[0]
            fresh = ((cpu.get(key, 0) & cpu_deep) | (disk.get(key, 0) & disk_deep)) & not_on_gpu
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
        g_of = {w: d for d, mask in begin.items() for w in members(mask)}
        c_of = {w: d for mask, d in c_stops for w in members(mask)}
        workers = self._workers
        return {workers[w]: (g_of[w], c_of[w], d) for mask, d in u_stops for w in members(mask)}

    def _walk_each(self, keys: list[int], begin: dict[int, int]) -> dict[Worker, tuple[int, int, int]]:
        """The sweep for a few workers, each on its own: a block is on its GPU or in a tier iff
        the GPU's or the tier's table has the worker on it. The compiled tables walk that in one
        call a run (`_holders.walk_each`); with the dicts, the worker's blocks held in a tier and
        not on its GPU (`deep`: small sets) stand for the tier's table, asked first."""
        cpu_tier, disk_tier = self.lower.get(CPU), self.lower.get(DISK)
        if self._walk is not None:
            cpu = (self.holders, cpu_tier.holders) if cpu_tier is not None else (self.holders,)
            tables = (*cpu, disk_tier.holders) if disk_tier is not None else cpu
            return self._walk(keys, begin, self._workers, len(cpu), *tables)
        empty: set[int] = set()
        gpu = self.holders
        n = len(keys)
        out = {}
        for g, mask in begin.items():
            for w in members(mask):
                bit = 1 << w
                on_cpu = cpu_tier.deep.get(w, empty) if cpu_tier is not None else empty
                on_disk = disk_tier.deep.get(w, empty) if disk_tier is not None else empty
                d = g
                while d < n and (keys[d] in on_cpu or gpu.get(keys[d], 0) & bit):
                    d += 1
                c = d
                while d < n and (keys[d] in on_disk or keys[d] in on_cpu or gpu.get(keys[d], 0) & bit):
                    d += 1
                out[self._workers[w]] = (g, c, d)
        return out

    def block_count(self) -> int:
        """Blocks on the workers' GPUs (offload tiers: `tier_block_count`); a pass over them all."""
        return sum(mask.bit_count() for mask in self.holders.values())

    def tier_block_count(self, tier: int) -> int:
        if tier == GPU:
            return self.block_count()
        return sum(mask.bit_count() for mask in self._tier(tier).holders.values())
