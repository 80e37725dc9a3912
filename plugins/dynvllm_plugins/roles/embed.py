"""Embedding role: a vLLM engine with a pooling runner; its `embed` stage ends a request's chain
and answers once (`dynvllm serve embed --model M` serves `/v1/embeddings` on its own)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynvllm.worker.role import EngineHandle, Role

EMBED = "embed"


class EmbedRole(Role):
    standalone = True
    description = "Embedding worker: a vLLM engine with a pooling runner (serves /v1/embeddings)."
    stage = EMBED

    def engine_overrides(self, settings: Any) -> dict[str, Any]:
        # vLLM turns a generative checkpoint into an embedding model (last-token pooling) unless
        # the checkpoint is one already; a --runner/--convert of the user's wins.
        argv = settings.vllm_argv()
        overrides = dict(super().engine_overrides(settings))
        if "--runner" not in argv:
            overrides["runner"] = "pooling"
        if "--convert" not in argv:
            overrides["convert"] = "embed"
        return overrides

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        pool = engine.pool
        assert pool is not None

        async def embed(payload: Any) -> dict:
            return await pool(payload, EMBED)

        return {EMBED: embed}
