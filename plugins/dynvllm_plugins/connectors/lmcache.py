"""LMCache: KV offload and sharing through LMCache (GPU hosts)."""

from __future__ import annotations

from typing import Any

from dynvllm.worker.connector import Connector


class LMCacheConnector(Connector):
    produces_transfer_params = False
    package = "lmcache"
    install_hint = "lmcache"

    def vllm_config(self, kv_role: str, settings: Any) -> dict | None:
        return {"kv_connector": "LMCacheConnectorV1", "kv_role": kv_role}
