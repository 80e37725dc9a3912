"""What a role plugin provides (entry-point group `dynvllm.roles`).

A role is a class; the worker instantiates it and asks it questions instead of testing its
name. A role serves one stage of a request's chain (its `stage`, published in the model card);
a role whose stage runs before generation also gives the frontend the `Stage` that decides
when to call it. Role modules must not import vLLM at module level: the CLI and the frontend
import them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynvllm import protocol

if TYPE_CHECKING:
    from dynvllm.settings import Settings
    from dynvllm.stages import Stage


@dataclass(frozen=True)
class EngineHandle:
    """What a role may use of its worker's engine."""

    generate: Callable[[Any], AsyncIterator[dict]]
    #: One pooling call for a task (embed, classify ...): `pool(payload, task)`.
    pool: Callable[[Any, str], Awaitable[dict]] | None = None
    #: The worker's settings (a role's own group: `settings.plugin(NAME)`).
    settings: Settings | None = None


class Role:
    """Base class for roles."""

    #: Serves complete requests on its own, so `serve <role>` can start a whole service.
    standalone: bool = False
    #: Short description shown in `dynvllm serve --help`.
    description: str = ""
    #: The stage of a request's chain this role serves: the endpoint the frontend calls.
    stage: str = protocol.GENERATE
    #: The stage ends a request's chain: the frontend streams the answer from it (generate, embed,
    #: score ...). Stages that run before another (prefill, encode) are not terminal.
    terminal: bool = True
    #: vLLM KV-transfer role ("kv_producer", "kv_consumer") when the role moves KV between engines.
    kv_role: str | None = None
    #: KV connectors used when --connector is not given (roles with a kv_role only).
    default_connectors: tuple[str, ...] = ()

    def prepare_service(self, settings: Settings) -> Callable[[], None] | None:
        """Make what the role needs for as long as a service runs (a folder its workers share).

        `serve` calls it once per role of the topology it starts, before `check` and before any
        process starts; what it sets in `settings` reaches every process. Returns what to call
        once the service has stopped (None: nothing to release).
        """
        return None

    def check(self, settings: Settings) -> None:
        """Raise ValueError if the settings cannot run this role (called before any process starts)."""
        if self.kv_role:
            from dynvllm.worker.connector import transfer_config

            transfer_config(self.connectors(settings), self.kv_role, settings)

    def connectors(self, settings: Settings) -> list[str]:
        return settings.worker.connectors() or list(self.default_connectors)

    def engine_overrides(self, settings: Settings) -> dict[str, Any]:
        """AsyncEngineArgs attributes this role sets: the KV-transfer configuration, if any,
        and what its connectors need of the engine (roles add their own by overriding this).

        Also sets the environment the connectors need (side-channel ports): this runs in the
        worker process right before its engine starts, and the engine processes inherit it.
        """
        if not self.kv_role:
            return {}
        import os

        from vllm.config import KVTransferConfig

        from dynvllm.worker.connector import connector_engine_overrides, transfer_config

        names = self.connectors(settings)
        cfg, env, _ = transfer_config(names, self.kv_role, settings)
        os.environ.update(env)
        if cfg is None:
            return {}
        return {
            **connector_engine_overrides(names, self.kv_role, settings),
            "kv_transfer_config": KVTransferConfig(**cfg),
        }

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        """Endpoints this role serves, by name; the stage's endpoint among them."""
        return {self.stage: engine.generate}

    def request_stage(self, settings: Settings) -> Stage | None:
        """The frontend's side of a stage that runs before generation (None for generate roles),
        given the frontend's settings (a stage reads its role's group: `settings.plugin(...)`)."""
        return None


@dataclass(frozen=True)
class Preset:
    """A named topology (entry-point group `dynvllm.presets`): `serve NAME` starts these roles."""

    description: str
    roles: dict[str, int]
