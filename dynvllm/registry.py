"""Plugins are entry points; this module names the groups once and loads them on demand.

Listing reads distribution metadata only; loading imports just the chosen plugin.
`DYN_LOAD_PLUGINS=name,name` restricts which plugins are visible (all by default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

# Loaded by worker processes to pick their role; the CLI lists it to build `serve` subcommands.
ROLES = "dynvllm.roles"
# Loaded by worker processes to build vLLM's KV-transfer configuration.
CONNECTORS = "dynvllm.connectors"
# Loaded by worker processes to create their engine (real vLLM, or a simulated one).
ENGINES = "dynvllm.engines"
# Loaded by the CLI to build `serve NAME` subcommands for named topologies (e.g. disagg).
PRESETS = "dynvllm.presets"
# Loaded by the frontend: --tool-call-parser and --reasoning-parser.
TOOL_PARSERS = "dynvllm.tool_parsers"
REASONING_PARSERS = "dynvllm.reasoning_parsers"
# Loaded by the frontend: the APIs it serves (--api-surfaces), each over the shared request path.
API_SURFACES = "dynvllm.api_surfaces"
# Loaded by the frontend: --router NAME (a `dynvllm.router.policies.Policy` factory).
ROUTER_POLICIES = "dynvllm.router_policies"
# Loaded by every process that builds settings (the CLI for flags and help, each child when it
# reads its settings): NAME -> a settings group class of a pure pydantic module, named like the
# plugin that reads it (`settings.plugin(NAME)`).
SETTINGS = "dynvllm.settings"
# Loaded by the planner process: --predictor NAME (a `dynvllm.planner.predictors.Predictor` factory)
# and --planner-connector NAME (what carries a scaling decision out).
PLANNER_PREDICTORS = "dynvllm.planner_predictors"
PLANNER_CONNECTORS = "dynvllm.planner_connectors"
GROUPS = (
    ROLES,
    CONNECTORS,
    ENGINES,
    PRESETS,
    TOOL_PARSERS,
    REASONING_PARSERS,
    API_SURFACES,
    ROUTER_POLICIES,
    SETTINGS,
    PLANNER_PREDICTORS,
    PLANNER_CONNECTORS,
)
_KIND = {
    ROLES: "role",
    CONNECTORS: "connector",
    ENGINES: "engine",
    PRESETS: "preset",
    TOOL_PARSERS: "tool parser",
    REASONING_PARSERS: "reasoning parser",
    API_SURFACES: "API surface",
    ROUTER_POLICIES: "router policy",
    SETTINGS: "settings group",
    PLANNER_PREDICTORS: "planner predictor",
    PLANNER_CONNECTORS: "planner connector",
}


class PluginError(Exception):
    """A plugin could not be found or imported; the message says what to do."""


@dataclass(frozen=True)
class PluginInfo:
    group: str
    name: str
    target: str
    distribution: str
    version: str


def _allow_list() -> set[str] | None:
    allow = os.environ.get("DYN_LOAD_PLUGINS")
    return None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}


def _entry_points(group: str) -> list[EntryPoint]:
    """The group's plugins, restricted by DYN_LOAD_PLUGINS in groups it names a plugin of: a
    list written for roles (`agg,prefill`) leaves router policies, surfaces ... as installed."""
    seen: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        seen.setdefault(ep.name, ep)
    allow = _allow_list()
    if allow is not None and allow & set(seen):
        seen = {name: ep for name, ep in seen.items() if name in allow}
    return sorted(seen.values(), key=lambda ep: ep.name)


def installed(group: str) -> list[PluginInfo]:
    """Every visible plugin of a group, without importing any of them."""
    out = []
    for ep in _entry_points(group):
        dist = ep.dist
        out.append(
            PluginInfo(group, ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
        )
    return out


def names(group: str) -> list[str]:
    return [ep.name for ep in _entry_points(group)]


def load(group: str, name: str) -> Any:
    """Import and return one plugin object; errors name the cause and what is installed."""
    kind = _KIND.get(group, group)
    for ep in _entry_points(group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:  # the plugin's own failure, shown with its cause
                raise PluginError(
                    f"{kind} plugin {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
    available = ", ".join(names(group)) or "none"
    kinds = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
    raise PluginError(
        f"no {kind} plugin named {name!r}; installed {kinds}: {available}. "
        f"Install a package that provides it under the entry-point group {group!r}."
    )
