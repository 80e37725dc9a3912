"""Which worker holds which KV blocks (pure logic, single-threaded).

Blocks are keyed by the router's own chain hashes (see `hashing`), which workers compute from
their engine's events before relaying them (`block_keys`). `kv-approx` inserts predicted blocks
with an expiry instead of learning from events.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterator

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
            self._store(self._id(worker), event[1])
        elif kind == "removed":
            wid = self._id(worker)
            for key in event[1]:
                self._discard(wid, key)
        elif kind == "cleared":
            self.drop_worker(worker)

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

    def store(self, worker: Worker, keys: list[int]) -> None:
        """Blocks a worker holds, as a snapshot says (the bulk path of `apply`)."""
        self._store(self._id(worker), keys)

    # ---- queries ---------------------------------------------------------------
    def overlaps(self, keys: list[int]) -> dict[Worker, int]:
        """For each worker, how many leading blocks of `keys` it holds."""
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
        workers = self._workers
        result = {workers[w]: d for w, d in depth_of.items()}
        for w in active:
            result[workers[w]] = depth
        return result

    def block_count(self) -> int:
        return sum(len(k) for k in self._keys_of.values())
