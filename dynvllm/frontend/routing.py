"""The frontend's router: a policy, the load it has sent to each worker, and the KV index."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence

from dynvllm.router import hashing
from dynvllm.router.index import KvIndex
from dynvllm.router.kv_policy import KvPolicy
from dynvllm.router.policies import make_policy
from dynvllm.runtime.kv_topic import KvEventBatch
from dynvllm.settings import RouterSettings

KV_POLICIES = ("kv", "kv-approx")


class Router:
    def __init__(self, settings: RouterSettings | str) -> None:
        if isinstance(settings, str):
            settings = RouterSettings(router=settings)
        self.settings = settings
        self.policy_name = settings.router
        self.kv = settings.router in KV_POLICIES
        self.index = KvIndex()
        self.kv_policy = KvPolicy(self.index, settings.router_prefill_weight, settings.router_temperature)
        self.load_policy = None if self.kv else make_policy(settings.router)
        self.inflight: dict[str, float] = defaultdict(float)
        self.active_blocks: dict[str, float] = defaultdict(float)
        self._relay_seq: dict[str, int] = {}
        self._next_expiry = 0.0
        self.gaps = 0

    def choose(
        self,
        candidates: Sequence[str],
        tokens: Sequence[int] = (),
        block_size: int = 0,
        lora: str | None = None,
    ) -> tuple[str, int]:
        """(instance id, predicted cached blocks) for a request."""
        if not self.kv or block_size <= 0:
            policy = self.load_policy or make_policy("least-loaded")
            return policy.choose(candidates, self.inflight), 0
        keys = hashing.chain(tokens, block_size, lora)
        if self.policy_name == "kv-approx":
            now = time.monotonic()
            if now >= self._next_expiry:
                self.index.expire(now)
                self._next_expiry = now + 1.0
        decision = self.kv_policy.choose([(c, 0) for c in candidates], keys, self.active_blocks)
        iid = decision.worker[0]
        if self.policy_name == "kv-approx":
            self.index.predict(decision.worker, keys, self.settings.router_approx_ttl)
        return iid, decision.overlap_blocks

    def started(self, worker_id: str | None, blocks: float = 1.0) -> None:
        if worker_id:
            self.inflight[worker_id] += 1
            self.active_blocks[worker_id] += blocks

    def finished(self, worker_id: str | None, blocks: float = 1.0) -> None:
        if worker_id and self.inflight.get(worker_id, 0) > 0:
            self.inflight[worker_id] -= 1
            self.active_blocks[worker_id] = max(0.0, self.active_blocks[worker_id] - blocks)

    def forget(self, worker_id: str) -> None:
        self.inflight.pop(worker_id, None)
        self.active_blocks.pop(worker_id, None)
        self._relay_seq.pop(worker_id, None)
        self.index.drop_instance(worker_id)

    def on_kv_events(self, batch: KvEventBatch) -> None:
        """Apply relayed engine events; a gap in the relay sequence drops that worker's state."""
        if self.policy_name != "kv":
            return
        last = self._relay_seq.get(batch.instance_id)
        if last is not None and batch.seq != last + 1:
            self.gaps += 1
            self.index.drop_instance(batch.instance_id)
        self._relay_seq[batch.instance_id] = batch.seq
        worker = (batch.instance_id, batch.dp_rank)
        for ev in batch.events:
            self.index.apply(worker, tuple(ev))


def request_blocks(prompt_len: int, block_size: int) -> float:
    return float(math.ceil(prompt_len / block_size)) if block_size > 0 else 1.0
