"""What a role plugin provides (entry-point group `dynvllm.roles`).

A role is a class; the worker instantiates it and asks it questions instead of testing its
name. Role modules must not import vLLM at module level: the CLI may import them to run them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynvllm.settings import Settings
    from dynvllm.worker.service import Worker


class Role:
    """Base class for roles."""

    #: Serves complete requests on its own, so `serve <role>` can start a whole service.
    standalone: bool = False
    #: Short description shown in `dynvllm serve --help`.
    description: str = ""
    #: vLLM KV-transfer role ("kv_producer", "kv_consumer") when the role moves KV between engines.
    kv_role: str | None = None

    def check(self, settings: Settings) -> None:
        """Raise ValueError if the settings cannot run this role (called before any process starts)."""
        if self.kv_role:
            from dynvllm.worker.connector import transfer_config

            transfer_config(settings.worker.connectors(), self.kv_role, settings)

    def engine_overrides(self, settings: Settings) -> dict[str, Any]:
        """AsyncEngineArgs attributes this role sets: the KV-transfer configuration, if any.

        Also sets the environment the connectors need (side-channel ports): this runs in the
        worker process right before its engine starts, and the engine processes inherit it.
        """
        if not self.kv_role:
            return {}
        import os

        from vllm.config import KVTransferConfig

        from dynvllm.worker.connector import transfer_config

        cfg, env, _ = transfer_config(settings.worker.connectors(), self.kv_role, settings)
        os.environ.update(env)
        if cfg is None:
            return {}
        overrides: dict[str, Any] = {"kv_transfer_config": KVTransferConfig(**cfg)}
        if (
            settings.engine.tensor_parallel_size or 1
        ) == 1 and "--distributed-executor-backend" not in settings.vllm_argv():
            # NIXL's hand-shake stalls behind the GIL with the in-process executor.
            overrides["distributed_executor_backend"] = "mp"
        return overrides

    def handlers(self, worker: Worker) -> dict[str, Callable]:
        """Endpoints this role serves, by name."""
        raise NotImplementedError
