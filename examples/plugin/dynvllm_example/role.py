"""`capped`: an aggregated worker that refuses prompts over a token budget.

    dynvllm serve capped --model Qwen/Qwen3-0.6B --capped-max-prompt-tokens 512
    DYN_CAPPED_MAX_PROMPT_TOKENS=512 dynvllm serve capped --model Qwen/Qwen3-0.6B   # the same

A prompt over the budget gets HTTP 400 naming the limit (BadRequest crosses to the frontend as
a client error); everything else is served as the aggregated role serves it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from dynvllm.runtime.errors import BadRequest
from dynvllm.worker.role import EngineHandle, Role
from dynvllm_example.settings import CappedSettings


class CappedRole(Role):
    standalone = True  # `serve capped` starts NATS, the frontend and the workers, like `serve agg`
    description = "Aggregated worker that refuses prompts over --capped-max-prompt-tokens."

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        assert engine.settings is not None
        limit = engine.settings.plugin(CappedSettings).capped_max_prompt_tokens

        async def generate(payload: Any) -> AsyncIterator[dict]:
            n = len(payload.get("token_ids") or ()) if isinstance(payload, dict) else 0
            if n > limit:
                raise BadRequest(f"this service accepts prompts of at most {limit} tokens; this one has {n}")
            async for delta in engine.generate(payload):
                yield delta

        return {self.stage: generate}
