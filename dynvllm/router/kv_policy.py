"""The KV-aware choice: the worker where the request costs least, counting in KV blocks

    cost = weight x uncached prompt blocks  (the prefill the worker would run; 8 in the settings)
         + uncached prompt blocks           (which then join that worker's active blocks)
         + the worker's active blocks       (distinct blocks of its in-flight requests, less the
                                             leading blocks of this prompt they hold: `Load.others`)
                                             moved `decode_weight` of the way to the sum of its
                                             requests' contexts, shared prefix once per request
                                             (`Load.load`; 0.5 in the settings)

A prefix block held only in an offload tier (see `tiers`) is not prefilled but loaded: it costs
the tier's load cost (a share of a prefill) in place of 1 in the prefill term, and still joins
the active blocks.

Active blocks are distinct: requests in flight that share a prefix share its blocks in the engine,
so a request joining others with its prefix adds only its own blocks there. Counting every
request's whole prompt instead (the first version) made one request's worth of load imbalance
cancel a whole cached prefix: on a GPU, eight system prompts over two engines then cached no more
than round-robin did. The per-request term answers the opposite case: requests sharing one hot
prompt pile onto its holder, which looks lightly loaded by distinct blocks while every decode step
there reads each sequence's whole context. `--router-decode-weight` w in (0, 1] counts a prefix
that n requests share (1 - w + n w) times: a hot prompt then spreads once about
(prefill weight + 1) / w more requests run on its holder than elsewhere, while load that shares
nothing counts as before.

Pure logic. Ties go to the worker with less load, then to one the prompt's last block key
picks (the same in every frontend; prompts shorter than a block rotate); a positive temperature
samples from softmax(-cost / T) instead of taking the minimum.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from dynvllm.router.index import KvIndex, Worker
from dynvllm.router.tiers import DEFAULT_CPU_COST, DEFAULT_DISK_COST


@dataclass
class Decision:
    worker: Worker
    overlap_blocks: int
    cost: float


class KvPolicy:
    def __init__(
        self,
        index: KvIndex,
        prefill_weight: float = 1.0,
        temperature: float = 0.0,
        seed: int | None = None,
        cpu_cost: float = DEFAULT_CPU_COST,
        disk_cost: float = DEFAULT_DISK_COST,
    ) -> None:
        self.index = index
        self.prefill_weight = prefill_weight
        self.temperature = temperature
        #: Loading a block from the CPU / disk tier, as a share of prefilling it.
        self.cpu_cost, self.disk_cost = cpu_cost, disk_cost
        self._rng = random.Random(seed)
        self._rr = itertools.count()

    @overload
    def choose(
        self,
        candidates: Sequence[Worker],
        keys: list[int],
        load_blocks: Mapping[str, float],
        per_rank: Literal[False] = False,
    ) -> Decision: ...
    @overload
    def choose(
        self,
        candidates: Sequence[Worker],
        keys: list[int],
        load_blocks: Mapping[Worker, float],
        per_rank: Literal[True],
    ) -> Decision: ...
    def choose(
        self,
        candidates: Sequence[Worker],
        keys: list[int],
        # Keyed as `per_rank` says (the overloads above pair them for callers).
        load_blocks: Mapping[Any, float],
        per_rank: bool = False,
    ) -> Decision:
        """`load_blocks` is keyed by instance id (a worker's first element), or by the whole
        (instance, rank) worker with `per_rank`. One pass over the candidates: this runs for every
        request, with up to thousands of workers."""
        gpu, further = self.index.lookup(keys) if keys else ({}, {})
        get = load_blocks.get
        # Two loops rather than a key function: a call per candidate would cost more than the rest.
        loads = [get(w, 0.0) for w in candidates] if per_rank else [get(w[0], 0.0) for w in candidates]
        # An uncached block is prefilled, then held active.
        n, weight = len(keys), self.prefill_weight + 1.0
        get_overlap = gpu.get
        costs = [weight * (n - get_overlap(w, 0)) + ld for w, ld in zip(candidates, loads, strict=True)]
        if further:  # a few workers hold more of the prompt in an offload tier
            overlaps, costs = self._tiered_costs(candidates, keys, loads, costs, gpu, further)
            get_overlap = overlaps.get
        if self.temperature > 0:
            low = min(costs)
            weights = [math.exp(-(c - low) / self.temperature) for c in costs]
            i = self._rng.choices(range(len(candidates)), weights)[0]
            return Decision(candidates[i], get_overlap(candidates[i], 0), costs[i])
        best = min(costs)
        tied = [i for i, c in enumerate(costs) if c == best]
        if len(tied) > 1:
            least = min(loads[i] for i in tied)
            tied = sorted((i for i in tied if loads[i] == least), key=lambda i: candidates[i])
        # The prompt picks among equals (its last key spreads distinct prompts), not a counter of
        # this process: frontends that share their load must choose alike for the same prompt.
        i = tied[(keys[-1] if keys else next(self._rr)) % len(tied)]
        return Decision(candidates[i], get_overlap(candidates[i], 0), costs[i])

    def _tiered_costs(
        self,
        candidates: Sequence[Worker],
        keys: list[int],
        loads: list[float],
        costs: list[float],
        gpu: dict[Worker, int],
        further: dict[Worker, tuple[int, int, int]],
    ) -> tuple[dict[Worker, int], list[float]]:
        """Costs of the workers that `further` names, the others' as they are; the overlap
        reported is what the engine finds cached anywhere (vLLM counts blocks its connector loads
        among a request's cached tokens)."""
        n, weight = len(keys), self.prefill_weight
        on_cpu, on_disk = weight * self.cpu_cost, weight * self.disk_cost
        tiers_of = further.get
        out = [
            cost
            if (t := tiers_of(w)) is None
            else weight * (n - t[2]) + on_cpu * (t[1] - t[0]) + on_disk * (t[2] - t[1]) + (n - t[0]) + ld
            for w, cost, ld in zip(candidates, costs, loads, strict=True)
        ]
        return {**gpu, **{w: t[2] for w, t in further.items()}}, out
