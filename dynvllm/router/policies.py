"""Load-based policies. Pure logic: candidates and their load in, one choice out."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol


class Policy(Protocol):
    def choose(self, candidates: Sequence[str], load: dict[str, float]) -> str: ...


class RoundRobin:
    def __init__(self) -> None:
        self._n = itertools.count()

    def choose(self, candidates: Sequence[str], load: dict[str, float]) -> str:
        return sorted(candidates)[next(self._n) % len(candidates)]


class Random:
    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[str], load: dict[str, float]) -> str:
        return self._rng.choice(list(candidates))


class LeastLoaded:
    """Fewest in-flight requests; ties rotate so equal workers share the load."""

    def __init__(self) -> None:
        self._n = itertools.count()

    def choose(self, candidates: Sequence[str], load: dict[str, float]) -> str:
        low = min(load.get(c, 0.0) for c in candidates)
        best = sorted(c for c in candidates if load.get(c, 0.0) == low)
        return best[next(self._n) % len(best)]


POLICIES = {"round-robin": RoundRobin, "random": Random, "least-loaded": LeastLoaded}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}") from None
