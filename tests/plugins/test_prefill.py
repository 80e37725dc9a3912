"""The prefill role's frontend stage decides from its own settings group whether a prompt is
worth the hop (the hop itself is tested end to end in tests/e2e/test_disagg.py)."""

from __future__ import annotations

import asyncio

from dynvllm import settings as S
from dynvllm.stages import StageContext
from dynvllm_plugins.roles.prefill import PrefillRole, PrefillStage
from dynvllm_plugins.roles.prefill_settings import PrefillSettings


def _outcome(stage: PrefillStage, prompt_len: int, cached_blocks: int = 0) -> str:
    async def call(endpoint, payload, timeout):
        return "w", {"kv_transfer_params": {"remote_block_ids": [1]}}

    ctx = StageContext(
        "r", list(range(prompt_len)), {"max_tokens": 4}, 16, cached_blocks, lambda e: True, call
    )
    return asyncio.run(stage.run(ctx))


def test_the_skip_rules_follow_the_group():
    stage = PrefillStage(PrefillSettings(disagg_min_prompt_tokens=100, disagg_max_cached_fraction=0.25))
    assert _outcome(stage, 99) == "skipped_short"
    assert _outcome(stage, 100) == "remote"
    assert _outcome(stage, 128, cached_blocks=2) == "remote"  # 32 of 128 cached: at the limit
    assert _outcome(stage, 128, cached_blocks=3) == "skipped_cached"
    eager = PrefillStage(PrefillSettings(disagg_min_prompt_tokens=0, disagg_max_cached_fraction=1))
    assert _outcome(eager, 1) == "remote" and _outcome(eager, 32, cached_blocks=2) == "remote"


def test_the_role_builds_its_stage_from_the_frontends_settings():
    settings = S.build_settings({"prefill": {"disagg_min_prompt_tokens": 8}})
    stage = PrefillRole().request_stage(settings)
    assert stage.settings is settings.plugin(PrefillSettings)
    assert _outcome(stage, 7) == "skipped_short" and _outcome(stage, 8) == "remote"
