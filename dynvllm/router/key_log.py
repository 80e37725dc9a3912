"""A worker's blocks in one tier, as the event key lists they were stored with (pure).

Ingest only appends an event's list (no per-block work); the keys are needed only to forget
the worker or to snapshot it. `KeyLog` keeps the lists as they came, less `gone`: the keys
removed since it was last compacted (a store takes its keys back out). Compaction (dedupe, drop
what went) runs when what went outweighs what is logged, or the log has grown fourfold: its
work is in proportion to the removals, or amortized over the growth, and the log stays within a
few times what the worker holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, filterfalse

LOG_MIN = 4096  # keys a log may hold before it is first compacted


class KeyLog:
    __slots__ = ("gone", "kept", "last_held", "lists", "size", "tidy")

    def __init__(self) -> None:
        self.lists: list[list[int]] = []
        self.size = 0  # keys in `lists`
        self.kept = 0  # keys kept by the last compaction
        self.gone: set[int] = set()
        self.tidy = True  # `lists` is one list of distinct held keys (or none)
        self.last_held = False  # every key of `lists[-1]` is held (nothing removed since)

    def add(self, keys: list[int]) -> None:
        self.lists.append(keys)
        self.size += len(keys)
        self.tidy = False
        self.last_held = True
        if self.gone:
            self.gone.difference_update(keys)
        if self.size > 4 * max(LOG_MIN, self.kept):
            self.held()

    def drop(self, keys: list[int]) -> None:
        """`keys` were removed (each was held)."""
        self.gone.update(keys)
        self.tidy = self.last_held = False
        if len(self.gone) > max(LOG_MIN, self.size // 2):
            self.held()

    def held(self) -> list[int]:
        """The keys held now, distinct (compacting the log to them)."""
        if not self.tidy:
            keys: Iterable[int] = dict.fromkeys(chain.from_iterable(self.lists))
            if self.gone:
                keys = filterfalse(self.gone.__contains__, keys)
            kept = list(keys)
            self.lists, self.size, self.kept, self.gone, self.tidy = [kept], len(kept), len(kept), set(), True
            self.last_held = True
        return self.lists[0] if self.lists else []
