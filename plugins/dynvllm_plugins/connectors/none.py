"""No KV transfer: each engine computes its prompts itself."""

from __future__ import annotations

from typing import Any

from dynvllm.worker.connector import Connector


class NoConnector(Connector):
    def vllm_config(self, kv_role: str, settings: Any) -> dict | None:
        return None
