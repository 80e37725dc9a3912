"""The KV-aware choice: cheapest of weight x uncached prefill blocks + active decode blocks.

Pure logic. Ties go to the worker with less load, then rotate; a positive temperature samples
from softmax(-cost / T) instead of taking the minimum.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from dynvllm.router.index import KvIndex, Worker


@dataclass
class Decision:
    worker: Worker
    overlap_blocks: int
    cost: float


class KvPolicy:
    def __init__(self, index: KvIndex, prefill_weight: float = 1.0, temperature: float = 0.0,
                 seed: Optional[int] = None) -> None:
        self.index = index
        self.prefill_weight = prefill_weight
        self.temperature = temperature
        self._rng = random.Random(seed)
        self._rr = itertools.count()

    def costs(self, candidates: Sequence[Worker], keys: list[int], load_blocks: dict[Worker, float]) -> dict[Worker, tuple[float, int]]:
        overlaps = self.index.overlaps(keys)
        n = len(keys)
        return {w: (self.prefill_weight * (n - overlaps.get(w, 0)) + load_blocks.get(w, 0.0), overlaps.get(w, 0))
                for w in candidates}

    def choose(self, candidates: Sequence[Worker], keys: list[int], load_blocks: dict[Worker, float]) -> Decision:
        costs = self.costs(candidates, keys, load_blocks)
        if self.temperature > 0:
            low = min(c for c, _ in costs.values())
            weights = [math.exp(-(costs[w][0] - low) / self.temperature) for w in candidates]
            w = self._rng.choices(list(candidates), weights)[0]
            return Decision(w, costs[w][1], costs[w][0])
        best = min(c for c, _ in costs.values())
        tied = [w for w in candidates if costs[w][0] == best]
        if len(tied) > 1:
            least = min(load_blocks.get(w, 0.0) for w in tied)
            tied = sorted(w for w in tied if load_blocks.get(w, 0.0) == least)
        w = tied[next(self._rr) % len(tied)]
        return Decision(w, costs[w][1], costs[w][0])
