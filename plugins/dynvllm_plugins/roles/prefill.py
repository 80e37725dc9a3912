"""Prefill role: computes a prompt's KV cache and hands it to a decode worker (KV producer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynvllm import protocol
from dynvllm.runtime.errors import BadRequest
from dynvllm.worker.role import Role


class PrefillRole(Role):
    description = "Prefill worker: computes prompts, hands KV to decode workers."
    kv_role = "kv_producer"

    def handlers(self, worker: Any) -> dict[str, Callable]:
        generate = worker.generate_handler()

        async def prefill(payload: Any) -> dict:
            """One token with `do_remote_decode`: the reply's kv_transfer_params point at our blocks."""
            if not isinstance(payload, dict):
                raise BadRequest("prefill expects a generate request")
            request = dict(payload)
            request["sampling"] = {
                **(payload.get("sampling") or {}),
                "max_tokens": 1,
                "n": 1,
                "min_tokens": None,
                "logprobs": None,
            }
            request["kv_transfer_params"] = {"do_remote_decode": True}
            last: dict = {}
            async for d in generate(request):
                last.update(d)
            return last

        return {protocol.PREFILL: prefill}
