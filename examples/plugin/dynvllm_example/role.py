"""`capped`: an aggregated worker that refuses prompts over a token budget.

    CAPPED_MAX_PROMPT_TOKENS=512 dynvllm serve capped --model Qwen/Qwen3-0.6B

A prompt over the budget gets HTTP 400 naming the limit (BadRequest crosses to the frontend as
a client error); everything else is served as the aggregated role serves it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from dynvllm.runtime.errors import BadRequest
from dynvllm.worker.role import EngineHandle, Role


class CappedRole(Role):
    standalone = True  # `serve capped` starts NATS, the frontend and the workers, like `serve agg`
    description = "Aggregated worker that refuses prompts over CAPPED_MAX_PROMPT_TOKENS (default 64)."

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        limit = int(os.environ.get("CAPPED_MAX_PROMPT_TOKENS", "64"))

        async def generate(payload: Any) -> AsyncIterator[dict]:
            n = len(payload.get("token_ids") or ()) if isinstance(payload, dict) else 0
            if n > limit:
                raise BadRequest(f"this service accepts prompts of at most {limit} tokens; this one has {n}")
            async for delta in engine.generate(payload):
                yield delta

        return {self.stage: generate}
