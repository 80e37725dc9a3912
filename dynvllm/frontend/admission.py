"""The order in which waiting requests are let in (pure: no clock, no I/O; `gate.py` waits).

Lowest priority value first (vLLM's meaning: lower is earlier); within one priority, tenants take
turns (round-robin), so a tenant with a hundred waiting requests does not hold back one with a
single request behind it; within one tenant, first come first served.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        # priority -> tenant -> items; a tenant's position in its OrderedDict is its turn.
        self._levels: dict[int, OrderedDict[str, deque[T]]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, item: T, priority: int = 0, tenant: str = "") -> None:
        tenants = self._levels.setdefault(priority, OrderedDict())
        queue = tenants.get(tenant)
        if queue is None:
            queue = tenants[tenant] = deque()  # a tenant new to the level takes the last turn
        queue.append(item)
        self._len += 1

    def pop(self) -> T | None:
        """The next item, or None when empty."""
        if not self._levels:
            return None
        # Few distinct priorities are in use at once: a scan is cheaper than keeping a heap.
        level = min(self._levels)
        tenants = self._levels[level]
        tenant, queue = next(iter(tenants.items()))
        item = queue.popleft()
        if queue:
            tenants.move_to_end(tenant)  # its turn is over: the others go first
        else:
            del tenants[tenant]
            if not tenants:
                del self._levels[level]
        self._len -= 1
        return item

    def remove(self, item: T, priority: int = 0, tenant: str = "") -> bool:
        """Take out an item that stopped waiting (timed out, client gone); False if not queued."""
        tenants = self._levels.get(priority)
        queue = tenants.get(tenant) if tenants is not None else None
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        if not queue:
            assert tenants is not None
            del tenants[tenant]
            if not tenants:
                del self._levels[priority]
        self._len -= 1
        return True


def free_slots(limit_per_worker: int, workers: int, inflight: int) -> int:
    """Requests a model may start now: `limit_per_worker` for each ready worker, less those in
    flight (0 when saturated; a limit of 0 means no limit)."""
    if limit_per_worker <= 0:
        return 1 << 30
    return max(0, limit_per_worker * workers - inflight)
