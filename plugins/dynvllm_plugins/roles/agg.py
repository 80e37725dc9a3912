"""Aggregated role: prefill and decode in one engine; serves complete requests on its own."""

from __future__ import annotations

from typing import Any

from dynvllm.worker.role import Role
from dynvllm_plugins.roles import encoder_cache


class AggRole(Role):
    standalone = True
    description = "Aggregated worker: prefill and decode in one vLLM engine."

    def engine_overrides(self, settings: Any) -> dict[str, Any]:
        # Image embeddings an encode worker left are loaded instead of encoded again.
        return {**super().engine_overrides(settings), **encoder_cache.engine_overrides(settings)}
