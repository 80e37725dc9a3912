"""Aggregated role: prefill and decode in one engine; serves complete requests on its own."""

from __future__ import annotations

from dynvllm.worker.role import Role


class AggRole(Role):
    standalone = True
    description = "Aggregated worker: prefill and decode in one vLLM engine."
