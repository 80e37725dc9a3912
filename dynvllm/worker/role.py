"""What a role plugin provides (entry-point group `dynvllm.roles`).

A role is a class; the worker instantiates it and asks it questions instead of testing its
name. Role modules must not import vLLM at module level: the CLI may import them to run them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from dynvllm.settings import Settings
    from dynvllm.worker.service import Worker


class Role:
    """Base class for roles."""

    #: Serves complete requests on its own, so `serve <role>` can start a whole service.
    standalone: bool = False
    #: Short description shown in `dynvllm serve --help`.
    description: str = ""

    def engine_overrides(self, settings: "Settings") -> dict[str, Any]:
        """AsyncEngineArgs attributes this role sets (e.g. KV transfer configuration)."""
        return {}

    def handlers(self, worker: "Worker") -> dict[str, Callable]:
        """Endpoints this role serves, by name."""
        raise NotImplementedError
