"""Aggregated role: prefill and decode in one engine; serves complete requests on its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynvllm import protocol
from dynvllm.worker.role import Role


class AggRole(Role):
    standalone = True
    description = "Aggregated worker: prefill and decode in one vLLM engine."

    def handlers(self, worker: Any) -> dict[str, Callable]:
        return {protocol.GENERATE: worker.generate_handler()}
