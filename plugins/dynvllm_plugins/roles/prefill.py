"""Prefill role: computes a prompt's KV cache and hands it to a decode worker (KV producer).

The worker side serves `prefill` (one token with `do_remote_decode`); the frontend side is
`PrefillStage`, which decides per request whether the hop pays off and falls back to the decode
worker computing the prompt whenever it does not or fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dynvllm.runtime.errors import BadRequest, RemoteError
from dynvllm.stages import Stage, StageContext
from dynvllm.worker.role import EngineHandle, Role
from dynvllm_plugins.roles import encoder_cache
from dynvllm_plugins.roles.prefill_settings import PrefillSettings

log = logging.getLogger("dynvllm.prefill")
PREFILL = "prefill"


class PrefillRole(Role):
    description = "Prefill worker: computes prompts, hands KV to decode workers."
    stage = PREFILL
    terminal = False
    kv_role = "kv_producer"
    default_connectors = ("nixl",)

    def engine_overrides(self, settings: Any) -> dict[str, Any]:
        # The prompt's images: their embeddings, if an encode worker left them, are loaded.
        return {**super().engine_overrides(settings), **encoder_cache.engine_overrides(settings)}

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        generate = engine.generate

        async def prefill(payload: Any) -> dict:
            """One token with `do_remote_decode`: the reply's kv_transfer_params point at our blocks."""
            if not isinstance(payload, dict):
                raise BadRequest("prefill expects a generate request")
            request = dict(payload)
            sampling = {**(payload.get("sampling") or {}), "max_tokens": 1, "n": 1}
            request["sampling"] = {**sampling, "min_tokens": None, "logprobs": None}
            request["kv_transfer_params"] = {"do_remote_decode": True}
            last: dict = {}
            async for d in generate(request):
                last.update(d)
            return last

        return {PREFILL: prefill}

    def request_stage(self, settings: Any) -> Stage:
        return PrefillStage(settings.plugin(PrefillSettings))


class PrefillStage(Stage):
    """Runs after the generate (decode) worker is chosen, so it can see what that worker caches."""

    name = PREFILL
    order = 50
    metric = "dynvllm_disagg_prefill"
    metric_help = (
        "Prefill hops by outcome (remote, skipped_short, skipped_cached, no_prefill_worker, failed, ...)"
    )

    def __init__(self, settings: PrefillSettings) -> None:
        self.settings = settings

    async def run(self, ctx: StageContext) -> str:
        ps = self.settings
        n = len(ctx.prompt_ids)
        if not ctx.serving(PREFILL):
            return "no_prefill_worker"
        if n < ps.disagg_min_prompt_tokens:
            return "skipped_short"
        if ctx.target_cached_blocks * ctx.block_size > ps.disagg_max_cached_fraction * n:
            return "skipped_cached"
        try:
            # The decode request's own id: a connector that pushes KV (nixl-push) pairs the
            # prefill engine's finished blocks with the decode engine's registration by it.
            result = await ctx.call(PREFILL, ctx.request(), timeout=120)
        except (RemoteError, TimeoutError) as exc:
            log.warning("prefill failed, the decode worker computes the prompt: %s", exc)
            return "failed"
        params = (result or {}).get("kv_transfer_params")
        if not params:
            return "no_transfer_params"
        ctx.handoff["kv_transfer_params"] = params
        return "remote"
