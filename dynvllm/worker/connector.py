"""What a KV-connector plugin provides (entry-point group `dynvllm.connectors`), and how
several are combined. The core asks connectors what they do; it never tests their names.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from typing import Any

from dynvllm.settings import Settings

log = logging.getLogger("dynvllm.worker")


class Connector:
    #: The producer's output carries `kv_transfer_params` that the consumer needs.
    produces_transfer_params: bool = False
    #: Python package that must be importable (None: ships with vLLM).
    package: str | None = None
    #: What to `pip install` when `package` is missing.
    install_hint: str = ""
    #: vLLM's name of the connector this plugin configures, so a raw --kv-transfer-config that
    #: names it gets the plugin's `engine_overrides` too.
    kv_connector: str | None = None

    def vllm_config(self, kv_role: str, settings: Settings) -> dict[str, Any] | None:
        """One entry of vLLM's KVTransferConfig for this role, or None for no transfer."""
        raise NotImplementedError

    def worker_env(self, kv_role: str, settings: Settings) -> dict[str, str]:
        """Environment the engine needs (e.g. side-channel ports), set before it starts."""
        return {}

    def engine_overrides(self, kv_role: str, settings: Settings) -> dict[str, Any]:
        """AsyncEngineArgs attributes the engine needs with this connector (e.g. an executor)."""
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


def _vllm_names(cfg: Any) -> set[str]:
    """The vLLM connector names a KVTransferConfig dict uses, MultiConnector parts included."""
    if not isinstance(cfg, dict):
        return set()
    names = {cfg["kv_connector"]} if isinstance(cfg.get("kv_connector"), str) else set()
    for part in (cfg.get("kv_connector_extra_config") or {}).get("connectors") or ():
        names |= _vllm_names(part)
    return names


def connector_engine_overrides(names: list[str], kv_role: str, settings: Settings) -> dict[str, Any]:
    """What the connectors in use need of the engine beyond the transfer configuration; with a
    raw --kv-transfer-config, those of the installed connectors whose vLLM name it uses."""
    from dynvllm import registry

    if settings.worker.kv_transfer_config:
        used = _vllm_names(json.loads(settings.worker.kv_transfer_config))
        connectors = []
        for name in registry.names(registry.CONNECTORS):
            try:
                connector = registry.load(registry.CONNECTORS, name)()
            except registry.PluginError as exc:
                log.warning("connector %r not asked about --kv-transfer-config: %s", name, exc)
                continue
            if connector.kv_connector in used:
                connectors.append(connector)
    else:
        connectors = [registry.load(registry.CONNECTORS, name)() for name in names]
    out: dict[str, Any] = {}
    for connector in connectors:
        out.update(connector.engine_overrides(kv_role, settings))
    return out
