"""Binds the settings model to Typer: one `--flag` per settings field, generated, never restated.

A flag left out is passed as None, so the `DYN_*` environment twin or the default applies.
Plugins' settings groups (`dynvllm.settings.plugin_groups`) get flags the same way, each group
under its own heading in --help.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from pydantic import SecretStr, ValidationError

from dynvllm import settings as S


def _cli_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
    if typing.get_origin(base) is typing.Literal or base in (SecretStr, Path):
        return str
    if any(typing.get_origin(a) is typing.Literal for a in args):
        return str  # e.g. a count or "auto": the settings model validates the text
    return base


def _param_name(group: str, name: str) -> str:
    # GROUP__FIELD, as a Python identifier: plugin names may hold '-' or '.'.
    return "".join(c if c.isalnum() else "_" for c in group) + "__" + name


def _option(group: str, name: str, field: Any) -> inspect.Parameter:
    typ = _cli_type(field.annotation)
    flag = S.flag_name(name)
    decls = [f"{flag}/--no-{flag[2:]}"] if typ is bool else [flag]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    decls += list(extra.get("aliases", []))  # e.g. --host and --port, as `vllm serve` users type them
    help_text = f"{field.description or ''} (env: {S.env_name(name)})"
    if field.default not in (None, "") and not isinstance(field.default, SecretStr):
        help_text += f" (default: {field.default})"
    return inspect.Parameter(
        _param_name(group, name),
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            None, *decls, help=help_text, show_default=False, rich_help_panel=S.title(group)
        ),
        annotation=typ | None,
    )


def with_settings(*groups: str, plugins: bool = False) -> Callable:
    """Decorate a command taking `settings: Settings`; adds the groups' flags to its signature,
    and with `plugins` those of every plugin's settings group.

    Commands that accept `ctx: typer.Context` and allow extra args get unknown `--options`
    forwarded as vLLM engine arguments.
    """

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.name != "settings"]
        every = S.groups()
        names = [*groups, *(S.plugin_groups() if plugins else ())]
        added = [_option(g, n, f) for g in names for n, f in every[g].model_fields.items()]
        params = {_param_name(g, n): (g, n) for g in names for n in every[g].model_fields}

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            overrides: dict[str, dict] = {}
            for key in list(kwargs):
                if key in params:
                    group, name = params[key]
                    value = kwargs.pop(key)
                    if value is not None:
                        overrides.setdefault(group, {})[name] = value
            ctx = kwargs.get("ctx")
            extra = list(getattr(ctx, "args", None) or [])
            try:
                settings = S.build_settings(overrides, extra)
            except ValidationError as err:
                raise typer.BadParameter(S.explain(err)) from None
            return func(settings=settings, **kwargs)

        # inspect reads __signature__ from any callable; typeshed's function type does not declare it.
        wrapper.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        return wrapper

    return decorate
