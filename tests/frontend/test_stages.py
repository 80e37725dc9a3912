"""The prefill stage's decisions (skip, fall back, hand on), driven through a StageContext whose
calls are recorded. The real hop over NIXL is tested end to end in tests/e2e/test_disagg.py."""

from __future__ import annotations

import asyncio

from dynvllm import registry
from dynvllm.runtime.errors import InstanceLost
from dynvllm.settings import build_settings
from dynvllm.stages import StageContext


def _ctx(prompt_len: int, cached_blocks: int = 0, serving: bool = True, reply=None, fail=None):
    calls = []

    async def call(endpoint, payload, timeout):
        calls.append((endpoint, payload))
        if fail is not None:
            raise fail
        return "w-prefill", reply

    ctx = StageContext(
        "rid",
        list(range(prompt_len)),
        {"max_tokens": 8, "n": 2},
        32,
        cached_blocks,
        lambda endpoint: serving,
        call,
    )
    return ctx, calls


def _stage():
    settings = build_settings(
        {"prefill": {"disagg_min_prompt_tokens": 64, "disagg_max_cached_fraction": 0.5}}
    )
    return registry.load(registry.ROLES, "prefill")().request_stage(settings)


def test_roles_declare_their_stage_without_the_core_naming_them():
    settings = build_settings()
    assert registry.load(registry.ROLES, "agg")().request_stage(settings) is None
    assert registry.load(registry.ROLES, "decode")().request_stage(settings) is None
    stage = _stage()
    assert stage.name == registry.load(registry.ROLES, "prefill").stage == "prefill"


def test_prefill_hands_the_transfer_parameters_on():
    ctx, calls = _ctx(100, reply={"kv_transfer_params": {"remote_block_ids": [1, 2]}})
    assert asyncio.run(_stage().run(ctx)) == "remote"
    assert ctx.handoff == {"kv_transfer_params": {"remote_block_ids": [1, 2]}}
    assert ctx.workers == {"prefill": "w-prefill"}
    endpoint, payload = calls[0]
    assert (
        endpoint == "prefill"
        and payload["request_id"] == "rid"  # the decode request's: nixl-push pairs them by it
        and payload["token_ids"] == list(range(100))
    )


def test_prefill_skips_and_falls_back_without_a_hop():
    for ctx_args, outcome in [
        ({"prompt_len": 10}, "skipped_short"),
        ({"prompt_len": 100, "cached_blocks": 2}, "skipped_cached"),  # 64 of 100 tokens cached
        ({"prompt_len": 100, "serving": False}, "no_prefill_worker"),
    ]:
        ctx, calls = _ctx(**ctx_args)
        assert asyncio.run(_stage().run(ctx)) == outcome
        assert calls == [] and ctx.handoff == {}


def test_a_failed_prefill_leaves_the_prompt_to_the_decode_worker():
    ctx, calls = _ctx(100, fail=InstanceLost("gone"))
    assert asyncio.run(_stage().run(ctx)) == "failed" and len(calls) == 1 and ctx.handoff == {}
    ctx, _ = _ctx(100, reply={"token_ids": [3]})
    assert asyncio.run(_stage().run(ctx)) == "no_transfer_params" and ctx.handoff == {}
