"""The example's settings groups: each field becomes a `--flag` of `dynvllm serve` and a `DYN_*`
variable, shown in its own panel of `--help`. Pure pydantic: the CLI imports this for --help."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dynvllm.settings import SettingsGroup


class CappedSettings(SettingsGroup):
    title: ClassVar[str] = "Capped role (example plugin)"
    capped_max_prompt_tokens: int = Field(64, gt=0, description="Longest prompt the capped role accepts.")


class PrefixHashSettings(SettingsGroup):
    title: ClassVar[str] = "Prefix-hash router (example plugin)"
    prefix_hash_tokens: int = Field(
        16, gt=0, description="Prompt tokens the prefix-hash router hashes to pick a worker."
    )
