"""`shared-folder`: KV blocks handed between engines through files in a folder every engine
sees (vLLM's ExampleConnector). Slow; it shows the shape of a connector plugin.

    SHARED_KV_FOLDER=/mnt/kv dynvllm serve disagg --model M --connector shared-folder
"""

from __future__ import annotations

import os
from typing import Any

from dynvllm.worker.connector import Connector


class SharedFolderConnector(Connector):
    # Engines find each other's blocks by prompt hash in the folder: the prefill worker hands
    # nothing to the frontend.
    produces_transfer_params = False

    def vllm_config(self, kv_role: str, settings: Any) -> dict | None:
        folder = os.environ.get("SHARED_KV_FOLDER", "/tmp/dynvllm-shared-kv")
        return {
            "kv_connector": "ExampleConnector",
            "kv_role": kv_role,
            "kv_connector_extra_config": {"shared_storage_path": folder},
        }
