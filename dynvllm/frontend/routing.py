"""The frontend's router: a policy plus the load it sees (its own in-flight count per worker)."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

from dynvllm.router.policies import make_policy


class Router:
    def __init__(self, policy: str) -> None:
        self.policy_name = policy
        self.policy = make_policy(policy)
        self.inflight: dict[str, float] = defaultdict(float)

    def choose(self, candidates: Sequence[str]) -> str:
        return self.policy.choose(candidates, self.inflight)

    def started(self, worker_id: Optional[str]) -> None:
        if worker_id:
            self.inflight[worker_id] += 1

    def finished(self, worker_id: Optional[str]) -> None:
        if worker_id and self.inflight.get(worker_id, 0) > 0:
            self.inflight[worker_id] -= 1

    def forget(self, worker_id: str) -> None:
        self.inflight.pop(worker_id, None)
