"""What a KV-connector plugin provides (entry-point group `dynvllm.connectors`), and how
several are combined. The core asks connectors what they do; it never tests their names.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from dynvllm.settings import Settings


class Connector:
    #: The producer's output carries `kv_transfer_params` that the consumer needs.
    produces_transfer_params: bool = False
    #: Python package that must be importable (None: ships with vLLM).
    package: str | None = None
    #: What to `pip install` when `package` is missing.
    install_hint: str = ""

    def vllm_config(self, kv_role: str, settings: Settings) -> dict[str, Any] | None:
        """One entry of vLLM's KVTransferConfig for this role, or None for no transfer."""
        raise NotImplementedError

    def worker_env(self, kv_role: str, settings: Settings) -> dict[str, str]:
        """Environment the engine needs (e.g. side-channel ports), set before it starts."""
        return {}


class ConnectorError(ValueError):
    pass


def check_installed(name: str, connector: Connector) -> None:
    if connector.package and importlib.util.find_spec(connector.package) is None:
        raise ConnectorError(
            f"KV connector {name!r} needs the Python package {connector.package!r}, which is not installed: "
            f"pip install {connector.install_hint or connector.package}"
        )


def transfer_config(
    names: list[str], kv_role: str, settings: Settings
) -> tuple[dict | None, dict[str, str], bool]:
    """(KVTransferConfig dict, engine environment, produces_transfer_params) for a role."""
    from dynvllm import registry

    if settings.worker.kv_transfer_config:
        try:
            cfg = json.loads(settings.worker.kv_transfer_config)
        except ValueError as exc:
            raise ConnectorError(
                f"--kv-transfer-config / DYN_KV_TRANSFER_CONFIG is not valid JSON: {exc}"
            ) from None
        if not isinstance(cfg, dict):
            raise ConnectorError("--kv-transfer-config / DYN_KV_TRANSFER_CONFIG must be a JSON object")
        return cfg, {}, True
    parts, env, produces = [], {}, False
    for name in names:
        try:
            connector: Connector = registry.load(registry.CONNECTORS, name)()
        except registry.PluginError as exc:
            raise ConnectorError(str(exc)) from None
        check_installed(name, connector)
        cfg = connector.vllm_config(kv_role, settings)
        if cfg is not None:
            parts.append(cfg)
            env.update(connector.worker_env(kv_role, settings))
            produces = produces or connector.produces_transfer_params
    if not parts:
        return None, env, False
    if len(parts) == 1:
        return parts[0], env, produces
    return (
        {
            "kv_connector": "MultiConnector",
            "kv_role": kv_role,
            "kv_connector_extra_config": {"connectors": parts},
        },
        env,
        produces,
    )
