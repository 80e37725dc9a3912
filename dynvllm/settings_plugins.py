"""Settings groups that plugins declare (entry-point group `dynvllm.settings`): imported and
checked, so every field keeps one flag and one `DYN_*` name across the core and the plugins."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dynvllm import registry
from dynvllm.settings_base import ENV_PREFIX, SettingsGroup, env_name, flag_name

log = logging.getLogger("dynvllm.settings")


def _check(name: str, cls: object, core: Mapping[str, type], owners: dict[str, str]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, SettingsGroup)):
        raise ValueError(f"{cls!r} is not a dynvllm.settings.SettingsGroup subclass")
    if cls.model_config.get("env_prefix") != ENV_PREFIX:
        raise ValueError(f"its fields must read {ENV_PREFIX}* variables (keep SettingsGroup's env_prefix)")
    if name in core:
        raise ValueError(f"{name!r} is the name of a core group")
    for field in cls.model_fields:
        if field in owners:
            raise ValueError(
                f"its field {field!r} ({flag_name(field)} / {env_name(field)}) is already a setting "
                f"of group {owners[field]!r}"
            )


def load(core: Mapping[str, type[SettingsGroup]]) -> tuple[dict[str, type[SettingsGroup]], dict[str, str]]:
    """(usable plugin groups by name, the reason for each one left out).

    A group that cannot be used (its import fails, a name or field clashes) is left out with a
    warning instead of taking every command down; a plugin that asks for it gets the reason.
    """
    owners = {field: group for group, cls in core.items() for field in cls.model_fields}
    usable: dict[str, type[SettingsGroup]] = {}
    left_out: dict[str, str] = {}
    for name in registry.names(registry.SETTINGS):
        try:
            cls = registry.load(registry.SETTINGS, name)
            _check(name, cls, core, owners)
        except (registry.PluginError, ValueError) as exc:
            left_out[name] = str(exc)
            log.warning("settings group %r left out: %s", name, exc)
            continue
        usable[name] = cls
        owners.update(dict.fromkeys(cls.model_fields, name))
    return usable, left_out
