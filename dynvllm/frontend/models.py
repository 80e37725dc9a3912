"""Models the frontend can serve, built from the cards that workers publish in discovery."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from dynvllm.frontend.tokenizer import Tokenizer
from dynvllm.protocol import GENERATE
from dynvllm.runtime.discovery import Instance, Watcher
from dynvllm.settings import Settings
from dynvllm.stages import Stage

log = logging.getLogger("dynvllm.frontend")


@dataclass
class ModelEntry:
    name: str
    card: dict[str, Any]
    instances: dict[str, Instance] = field(default_factory=dict)
    tokenizer: Tokenizer | None = None
    #: Roles seen serving this model; their stages stay in the chain while workers come and go,
    #: so a stage can tell "no worker right now" from "not part of this service".
    roles: set[str] = field(default_factory=set)
    #: The stages before generation, in order (from the roles' plugins).
    stages: list[Stage] = field(default_factory=list)

    @property
    def servable(self) -> bool:
        """Some live worker serves a stage that ends a chain (generate, embed ...)."""
        return any(_terminal(inst) for inst in self.instances.values())

    def serves(self, terminal: str) -> bool:
        """Some live worker ends chains at `terminal` (a surface's endpoint needs that stage)."""
        return any(_terminal(inst) and terminal in inst.endpoints for inst in self.instances.values())

    @property
    def context_length(self) -> int:
        return int(self.card.get("context_length") or 0)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's own sampling defaults (its generation_config.json, as vLLM reads it)."""
        return self.card.get("sampling_defaults") or {}

    @property
    def max_tokens_cap(self) -> int | None:
        """A limit on every request's max_tokens, from --generation-config FOLDER or
        --override-generation-config's max_new_tokens."""
        return self.card.get("max_tokens_cap")


def _terminal(inst: Instance) -> bool:
    """A worker whose role ends chains; cards from before roles said so end them at generate."""
    card = inst.card
    if "terminal" in card:
        return bool(card["terminal"]) and card.get("stage", GENERATE) in inst.endpoints
    return GENERATE in inst.endpoints


class ModelRegistry:
    def __init__(
        self, watcher: Watcher, aliases: dict[str, str] | None = None, settings: Settings | None = None
    ) -> None:
        self.watcher = watcher
        #: What the roles' stages are built with (each reads its own plugin group).
        self.settings = settings or Settings()
        #: Other names for served models (alias -> model); a model of the same name wins.
        self.aliases = dict(aliases or {})
        self.models: dict[str, ModelEntry] = {}
        self._tokenizers: dict[str, Tokenizer] = {}
        self._loading: set[asyncio.Future] = set()
        #: Every adapter seen in a card: name -> (base model, source). Kept after workers drop it.
        self.adapter_sources: dict[str, tuple[str, str]] = {}
        #: Every model name a worker ever served: one with no worker now is restarting, not unknown.
        self.seen: set[str] = set()
        watcher.on_add.append(self._add)
        watcher.on_update.append(self._add)
        watcher.on_remove.append(self._remove)

    def _add(self, inst: Instance) -> None:
        name = inst.card.get("model")
        if inst.component != "worker" or not name:
            return
        self.seen.add(name)
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name, inst.card)
            task = asyncio.ensure_future(self._load_tokenizer(entry))
            self._loading.add(task)
            task.add_done_callback(self._loading.discard)
        for other in self.models.values():
            if other is not entry:
                other.instances.pop(inst.id, None)
        entry.instances[inst.id] = inst
        for adapter, source in (inst.card.get("lora_sources") or {}).items():
            self.adapter_sources[adapter] = (name, source)
        if inst.role and inst.role not in entry.roles:
            entry.roles.add(inst.role)
            stage = self._stage_of(inst.role)
            if stage is not None:
                entry.stages = sorted([*entry.stages, stage], key=lambda s: s.order)

    def _stage_of(self, role_name: str) -> Stage | None:
        """The request stage a role plugin declares; a plugin that fails to load is logged and
        its workers get no requests for that stage (the stage's fallback is not available)."""
        from dynvllm import registry

        try:
            return registry.load(registry.ROLES, role_name)().request_stage(self.settings)
        except Exception:
            log.exception("cannot load the stage of role %r; requests skip it", role_name)
            return None

    def _remove(self, inst: Instance) -> None:
        for name, entry in list(self.models.items()):
            if entry.instances.pop(inst.id, None) and not entry.instances:
                del self.models[name]

    async def _load_tokenizer(self, entry: ModelEntry) -> None:
        try:
            entry.tokenizer = await asyncio.to_thread(self.tokenizer_for, entry.card)
        except Exception as exc:
            log.error("cannot load the tokenizer of %s: %s", entry.name, exc)

    def tokenizer_for(self, card: dict) -> Tokenizer:
        from pathlib import Path

        from dynvllm.models.hub import resolve_model

        where = card.get("tokenizer") or card.get("path") or ""
        if not Path(where).is_dir():  # a worker on another host: fetch the tokenizer files here
            where = resolve_model(card.get("source") or where, tokenizer_only=True)
        tok = self._tokenizers.get(where)
        if tok is None:
            tok = self._tokenizers[where] = Tokenizer(where)
        return tok

    def adapters(self) -> dict[str, tuple[ModelEntry, list[str]]]:
        """Adapter name -> (its base model's entry, ids of the workers that hold it)."""
        out: dict[str, tuple[ModelEntry, list[str]]] = {}
        for entry in self.models.values():
            for iid, inst in entry.instances.items():
                for name in inst.card.get("loras") or ():
                    out.setdefault(name, (entry, []))[1].append(iid)
        return out

    def was_served(self, model: str) -> bool:
        """Some worker has served this model (by its own name) since the frontend started."""
        return model in self.seen or model in self.models

    def knows(self, name: str) -> bool:
        """A name this registry has seen: a model, an alias, or an adapter any worker ever held."""
        return (
            name in self.seen or name in self.models or name in self.aliases or name in self.adapter_sources
        )

    async def resolve(self, name: str) -> tuple[ModelEntry | None, str | None]:
        """(entry, adapter) for a model name: a base model, or an adapter some worker holds."""
        entry = await self.ready(name)
        if entry is None and name in self.aliases:
            entry = await self.ready(self.aliases[name])
        if entry is not None:
            return entry, None
        held = self.adapters().get(name)
        if held is None:
            return None, None
        return await self.ready(held[0].name), name

    async def ready(self, name: str) -> ModelEntry | None:
        entry = self.models.get(name)
        if entry is not None and entry.tokenizer is None:
            entry.tokenizer = await asyncio.to_thread(self.tokenizer_for, entry.card)
        return entry
