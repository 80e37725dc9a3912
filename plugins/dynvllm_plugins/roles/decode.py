"""Decode role: generates from KV a prefill worker computed (KV consumer); computes the prompt
itself when no prefill result comes with the request."""

from __future__ import annotations

from typing import Any

from dynvllm.worker.role import Role
from dynvllm_plugins.roles import encoder_cache


class DecodeRole(Role):
    description = "Decode worker: generates from KV handed over by prefill workers."
    kv_role = "kv_consumer"
    default_connectors = ("nixl",)

    def engine_overrides(self, settings: Any) -> dict[str, Any]:
        # Image embeddings an encode worker left are loaded instead of encoded again.
        return {**super().engine_overrides(settings), **encoder_cache.engine_overrides(settings)}
