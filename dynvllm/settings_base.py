"""What every settings group shares, the core's and the plugins': the `DYN_` prefix and the
names a field gets on the command line and in the environment.

A leaf module, so the plugin-group loader and the settings model both build on it.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DYN_"


class SettingsGroup(BaseSettings):
    """Base of every settings group: each field reads `DYN_<FIELD>` and gets `--<field>`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)
    #: Heading in --help and docs/configuration.md (a plugin's default: "NAME plugin").
    title: ClassVar[str] = ""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")
