"""Which worker holds which KV blocks (pure logic, single-threaded).

Blocks are keyed by the router's own chain hashes (see `hashing`). Per worker, engine hashes
map to keys so BlockRemoved events can be applied. `kv-approx` inserts predicted blocks with an
expiry instead of learning from events.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

from dynvllm.router import hashing

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
        #: key -> its holder, or a set when several hold it: most blocks live on one worker, and a
        #: tuple per key instead of a set saves memory and time at a million blocks.
        self.holders: dict[int, Worker | set[Worker]] = {}
        self._engine_to_key: dict[Worker, dict[int, int]] = defaultdict(dict)
        self._keys_of: dict[Worker, dict[int, float]] = defaultdict(dict)  # key -> expiry (inf: event-backed)

    # ---- events ---------------------------------------------------------------
    def apply(self, worker: Worker, event: tuple) -> None:
        kind = event[0]
        if kind == "stored":
            _, hashes, parent, tokens, block_size, lora = event
            to_key = self._engine_to_key[worker]
            parent_key = to_key.get(parent) if parent is not None else None
            if parent is not None and parent_key is None:
                return  # parent unknown (missed events): its children cannot be keyed
            keys = hashing.chain(tokens, block_size, lora, parent_key)
            if len(keys) > len(hashes):
                keys = keys[: len(hashes)]
            # The hot path of ingest (a million blocks a second at scale): bulk dict updates in C,
            # and one Python step per block only for the holder sets.
            to_key.update(zip(hashes, keys, strict=False))
            self._keys_of[worker].update(dict.fromkeys(keys, _EVENT_BACKED))
            holders = self.holders
            for key in keys:
                have = holders.get(key)
                if have is None:
                    holders[key] = worker
                elif have.__class__ is tuple:
                    if have != worker:
                        holders[key] = {have, worker}  # type: ignore[arg-type]
                else:
                    have.add(worker)  # type: ignore[union-attr]
        elif kind == "removed":
            mapping = self._engine_to_key.get(worker, {})
            for eh in event[1]:
                key = mapping.pop(eh, None)
                if key is not None:
                    self._discard(worker, key)
        elif kind == "cleared":
            self.drop_worker(worker)

    def _add(self, worker: Worker, key: int, expiry: float) -> None:
        have = self.holders.get(key)
        if have is None:
            self.holders[key] = worker
        elif have.__class__ is tuple:
            if have != worker:
                self.holders[key] = {have, worker}  # type: ignore[arg-type]
        else:
            have.add(worker)  # type: ignore[union-attr]
        self._keys_of[worker][key] = expiry

    def _unhold(self, worker: Worker, key: int) -> None:
        have = self.holders.get(key)
        if have is None:
            return
        if have.__class__ is tuple:
            if have == worker:
                del self.holders[key]
            return
        have.discard(worker)  # type: ignore[union-attr]
        if len(have) == 1:  # type: ignore[arg-type]
            self.holders[key] = next(iter(have))  # type: ignore[call-overload]
        elif not have:
            del self.holders[key]

    def _discard(self, worker: Worker, key: int) -> None:
        self._keys_of[worker].pop(key, None)
        self._unhold(worker, key)

    def drop_worker(self, worker: Worker) -> None:
        for key in list(self._keys_of.pop(worker, {})):
            self._unhold(worker, key)
        self._engine_to_key.pop(worker, None)

    def drop_instance(self, instance_id: str) -> None:
        for w in [w for w in self._keys_of if w[0] == instance_id]:
            self.drop_worker(w)

    # ---- predictions (kv-approx) ---------------------------------------------
    def predict(self, worker: Worker, keys: Iterable[int], ttl: float, now: float | None = None) -> None:
        expiry = (now if now is not None else time.monotonic()) + ttl
        for key in keys:
            self._add(worker, key, max(expiry, self._keys_of[worker].get(key, 0.0)))

    def expire(self, now: float | None = None) -> None:
        now = now if now is not None else time.monotonic()
        for worker, keys in list(self._keys_of.items()):
            for key in [k for k, exp in keys.items() if exp <= now]:
                self._discard(worker, key)

    # ---- queries ---------------------------------------------------------------
    def overlaps(self, keys: list[int]) -> dict[Worker, int]:
        """For each worker, how many leading blocks of `keys` it holds."""
        if not keys:
            return {}
        holders = self.holders
        first = holders.get(keys[0])
        if not first:
            return {}
        # Set operations run in C; Python only touches a worker when it drops out of the prefix.
        result: dict[Worker, int] = {}
        active = {first} if first.__class__ is tuple else set(first)  # type: ignore[arg-type]
        depth = 1
        for key in keys[1:]:
            have = holders.get(key)
            if not have:
                break
            if have.__class__ is not tuple:
                still = active & have  # type: ignore[operator]
            elif have in active:
                still = {have}
            else:
                break
            if not still:
                break
            for w in active - still:
                result[w] = depth
            active = still
            depth += 1
        for w in active:
            result[w] = depth
        return result

    def block_count(self) -> int:
        return sum(len(k) for k in self._keys_of.values())
