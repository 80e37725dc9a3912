"""No KV transfer: the engine computes every prompt itself."""

from __future__ import annotations

from typing import Any, Optional


class NoConnector:
    produces_transfer_params = False
    package: Optional[str] = None

    def kv_transfer_config(self, kv_role: str, settings: Any) -> Optional[dict]:
        return None
