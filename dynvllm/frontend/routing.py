"""The frontend's router: a policy (from `dynvllm.router.policies`) and the load it has sent out."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dynvllm.router.index import KvIndex
from dynvllm.router.policies import Load, Pick, make_policy
from dynvllm.runtime.kv_topic import KvEventBatch
from dynvllm.settings import RouterSettings, Settings


class Router:
    def __init__(self, settings: Settings | RouterSettings | str) -> None:
        if isinstance(settings, str):
            settings = RouterSettings(router=settings)
        if isinstance(settings, RouterSettings):
            settings = Settings(router=settings)
        self.settings = settings.router
        self.policy_name = self.settings.router
        # The whole settings: a policy may read its own plugin group.
        self.policy = make_policy(settings)
        self.load = Load()
        self.inflight = self.load.inflight

    @property
    def index(self) -> KvIndex | None:
        return self.policy.index

    @property
    def gaps(self) -> int:
        return getattr(self.policy, "gaps", 0)

    def choose(
        self,
        candidates: Sequence[str],
        tokens: Sequence[int] = (),
        block_size: int = 0,
        lora: str | None = None,
    ) -> Pick:
        """The worker (and rank, where the policy picks one) for a request."""
        return self.policy.choose(candidates, tokens, block_size, lora, self.load)

    def set_ranks(self, worker_id: str, first: int, count: int) -> None:
        """A data-parallel instance: its ranks are routing targets of their own."""
        if count > 1:
            self.load.ranks[worker_id] = (first, count)
        else:
            self.load.ranks.pop(worker_id, None)

    def started(
        self, worker_id: str | None, blocks: float = 1.0, rank: int | None = None, keys: Sequence[int] = ()
    ) -> None:
        """A request went to the worker: `blocks` of prompt, `keys` those of them the policy keyed."""
        if worker_id:
            self.inflight[worker_id] += 1
            self.load.add(worker_id, rank or 0, blocks, keys)

    def grow(self, worker_id: str | None, rank: int | None, blocks: int) -> None:
        """A request in flight there filled `blocks` more KV blocks with its output."""
        if worker_id and self.inflight.get(worker_id, 0) > 0:
            self.load.count(worker_id, rank or 0, blocks)

    def finished(
        self,
        worker_id: str | None,
        blocks: float = 1.0,
        rank: int | None = None,
        keys: Sequence[int] = (),
        grown: int = 0,
    ) -> None:
        """The request ended; `grown`: the blocks its output added (see `grow`)."""
        if worker_id and self.inflight.get(worker_id, 0) > 0:
            self.inflight[worker_id] -= 1
            self.load.remove(worker_id, rank or 0, blocks, keys)
            if grown:
                self.load.count(worker_id, rank or 0, -grown)

    def forget(self, worker_id: str) -> None:
        self.load.forget(worker_id)
        self.policy.forget(worker_id)

    def on_kv_events(self, batch: KvEventBatch) -> None:
        self.policy.on_kv_events(batch)


def request_blocks(prompt_len: int, block_size: int) -> float:
    return float(math.ceil(prompt_len / block_size)) if block_size > 0 else 1.0
