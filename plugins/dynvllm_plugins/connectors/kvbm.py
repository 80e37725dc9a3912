"""KVBM: Dynamo's KV block manager as a vLLM connector (GPU hosts)."""

from __future__ import annotations

from typing import Any

from dynvllm.worker.connector import Connector


class KvbmConnector(Connector):
    produces_transfer_params = False
    package = "kvbm"
    install_hint = "kvbm"

    def vllm_config(self, kv_role: str, settings: Any) -> dict | None:
        return {
            "kv_connector": "DynamoConnector",
            "kv_role": kv_role,
            "kv_connector_module_path": "kvbm.vllm_integration.connector",
        }
