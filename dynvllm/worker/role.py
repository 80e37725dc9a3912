"""What a role plugin provides (entry-point group `dynvllm.roles`).

A role is a class; the worker instantiates it and asks it questions instead of testing its
name. A role serves one stage of a request's chain (its `stage`, published in the model card);
a role whose stage runs before generation also gives the frontend the `Stage` that decides
when to call it. Role modules must not import vLLM at module level: the CLI and the frontend
import them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynvllm import protocol

if TYPE_CHECKING:
    from dynvllm.frontend.stages import Stage
    from dynvllm.settings import Settings


@dataclass(frozen=True)
class EngineHandle:
    """What a role may use of its worker's engine."""

    generate: Callable[[Any], AsyncIterator[dict]]


class Role:
    """Base class for roles."""

    #: Serves complete requests on its own, so `serve <role>` can start a whole service.
    standalone: bool = False
    #: Short description shown in `dynvllm serve --help`.
    description: str = ""
    #: The stage of a request's chain this role serves: the endpoint the frontend calls.
    stage: str = protocol.GENERATE
    #: vLLM KV-transfer role ("kv_producer", "kv_consumer") when the role moves KV between engines.
    kv_role: str | None = None
    #: KV connectors used when --connector is not given (roles with a kv_role only).
    default_connectors: tuple[str, ...] = ()
    #: vLLM encoder-cache role: "ec_producer" for roles that encode images for others. Other roles
    #: read what producers left (ec_consumer) whenever --encoder-cache-dir is set.
    ec_role: str | None = None

    def check(self, settings: Settings) -> None:
        """Raise ValueError if the settings cannot run this role (called before any process starts)."""
        if self.kv_role:
            from dynvllm.worker.connector import transfer_config

            transfer_config(self.connectors(settings), self.kv_role, settings)

    def connectors(self, settings: Settings) -> list[str]:
        return settings.worker.connectors() or list(self.default_connectors)

    def engine_overrides(self, settings: Settings) -> dict[str, Any]:
        """AsyncEngineArgs attributes this role sets: the KV-transfer configuration, if any.

        Also sets the environment the connectors need (side-channel ports): this runs in the
        worker process right before its engine starts, and the engine processes inherit it.
        """
        overrides = self._encoder_cache(settings)
        if not self.kv_role:
            return overrides
        import os

        from vllm.config import KVTransferConfig

        from dynvllm.worker.connector import transfer_config

        cfg, env, _ = transfer_config(self.connectors(settings), self.kv_role, settings)
        os.environ.update(env)
        if cfg is None:
            return overrides
        overrides["kv_transfer_config"] = KVTransferConfig(**cfg)
        single = (settings.engine.tensor_parallel_size or 1) == 1
        if single and "--distributed-executor-backend" not in settings.vllm_argv():
            # NIXL's hand-shake stalls behind the GIL with the in-process executor.
            overrides["distributed_executor_backend"] = "mp"
        return overrides

    def _encoder_cache(self, settings: Settings) -> dict[str, Any]:
        """vLLM's encoder-cache connector over a shared folder: producers store image embeddings
        by content hash, consumers load them instead of running the vision encoder (and run it
        themselves when an embedding is not there)."""
        folder = settings.worker.encoder_cache_dir
        if not folder:
            return {}
        from vllm.config import ECTransferConfig

        return {
            "ec_transfer_config": ECTransferConfig(
                ec_connector="ECExampleConnector",
                ec_role=self.ec_role or "ec_consumer",
                ec_connector_extra_config={"shared_storage_path": folder},
            )
        }

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        """Endpoints this role serves, by name; the stage's endpoint among them."""
        return {self.stage: engine.generate}

    def request_stage(self) -> Stage | None:
        """The frontend's side of a stage that runs before generation (None for generate roles)."""
        return None


@dataclass(frozen=True)
class Preset:
    """A named topology (entry-point group `dynvllm.presets`): `serve NAME` starts these roles."""

    description: str
    roles: dict[str, int]
