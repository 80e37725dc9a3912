"""vLLM's ExampleConnector: KV through files in a shared folder. Slow; for tests and demos."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from dynvllm.worker.connector import Connector


class ExampleConnector(Connector):
    produces_transfer_params = False

    def vllm_config(self, kv_role: str, settings: Any) -> dict | None:
        folder = os.environ.get("DYN_EXAMPLE_CONNECTOR_PATH") or os.path.join(
            tempfile.gettempdir(), "dynvllm-kv"
        )
        return {
            "kv_connector": "ExampleConnector",
            "kv_role": kv_role,
            "kv_connector_extra_config": {"shared_storage_path": folder},
        }
