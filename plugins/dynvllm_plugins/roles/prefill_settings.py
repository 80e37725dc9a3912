"""Settings of the prefill role (entry point `dynvllm.settings: prefill`): when a request's
prompt is worth the hop to a prefill worker. Pure pydantic: the CLI imports it for --help."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dynvllm.settings import SettingsGroup


class PrefillSettings(SettingsGroup):
    title: ClassVar[str] = "Prefill role (disaggregated serving)"
    disagg_min_prompt_tokens: int = Field(
        256, ge=0, description="Shorter prompts skip the prefill hop and run on the decode worker."
    )
    disagg_max_cached_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Skip the prefill hop when the decode worker already caches more than this share "
        "of the prompt.",
    )
