"""Stages: the hops a request makes before generation, declared by the roles that serve them.

A model's chain is built from the live workers' cards: each card names the stage its role
serves; a role whose stage is not `generate` gives the frontend a `Stage` (its `request_stage`).
The dispatcher chooses the generate worker first, then runs the stages in `order`; a stage
decides for itself when to skip (short prompt, mostly cached, no worker) and how to fall back
when its hop fails, and hands results on to generation through `ctx.handoff`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dynvllm import protocol


class Stage:
    """The frontend's side of one pre-generation stage (pure decisions; I/O through `ctx.call`)."""

    #: The endpoint this stage calls on workers; also its label in headers.
    name: str = ""
    #: Stages run in ascending order (encode before prefill, say).
    order: int = 100
    #: Prometheus counter of outcomes by model (empty: no metric).
    metric: str = ""
    metric_help: str = ""

    async def run(self, ctx: StageContext) -> str:
        """Make the hop or skip it; return the outcome (a short label for metrics and headers)."""
        raise NotImplementedError


@dataclass
class StageContext:
    """What a stage sees of one request, and the one way it reaches workers."""

    request_id: str
    prompt_ids: list[int]
    sampling: dict[str, Any]
    block_size: int
    #: Prompt blocks the chosen generate worker is predicted to hold already.
    target_cached_blocks: int
    serving: Callable[[str], bool]
    _call: Callable[[str, Any, float], Awaitable[tuple[str, Any]]]
    #: Fields added to the generate request (e.g. kv_transfer_params).
    handoff: dict[str, Any] = field(default_factory=dict)
    #: The worker each stage's hop went to, by stage name.
    workers: dict[str, str] = field(default_factory=dict)

    def request(self, suffix: str = "") -> dict[str, Any]:
        """The generate request as it stands, for a stage to send to its own endpoint."""
        return protocol.generate_request(
            self.request_id + suffix, self.prompt_ids, self.sampling, **self.handoff
        )

    async def call(self, endpoint: str, payload: Any, timeout: float = 30.0) -> Any:
        """Unary call on the worker the router picks for `endpoint`; load is accounted meanwhile."""
        worker, result = await self._call(endpoint, payload, timeout)
        self.workers[endpoint] = worker
        return result
