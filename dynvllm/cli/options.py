"""Binds the settings model to Typer: one `--flag` per settings field, generated, never restated.

A flag left out is passed as None, so the `DYN_*` environment twin or the default applies.
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
    return base


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
        f"{group}__{name}",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            None, *decls, help=help_text, show_default=False, rich_help_panel=S.GROUPS[group].title
        ),
        annotation=typ | None,
    )


def with_settings(*groups: str) -> Callable:
    """Decorate a command taking `settings: Settings`; adds the groups' flags to its signature.

    Commands that accept `ctx: typer.Context` and allow extra args get unknown `--options`
    forwarded as vLLM engine arguments.
    """

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.name != "settings"]
        added = [_option(g, n, f) for g in groups for n, f in S.GROUPS[g].model_fields.items()]

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            overrides: dict[str, dict] = {}
            for key in list(kwargs):
                if "__" in key:
                    group, name = key.split("__", 1)
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

        wrapper.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        return wrapper

    return decorate
