"""Models the frontend can serve, built from the cards that workers publish in discovery."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from dynvllm.frontend.tokenizer import Tokenizer
from dynvllm.runtime.discovery import Instance, Watcher

log = logging.getLogger("dynvllm.frontend")


@dataclass
class ModelEntry:
    name: str
    card: dict[str, Any]
    instances: dict[str, Instance] = field(default_factory=dict)
    tokenizer: Tokenizer | None = None

    @property
    def context_length(self) -> int:
        return int(self.card.get("context_length") or 0)


class ModelRegistry:
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.models: dict[str, ModelEntry] = {}
        self._tokenizers: dict[str, Tokenizer] = {}
        watcher.on_add.append(self._add)
        watcher.on_update.append(self._add)
        watcher.on_remove.append(self._remove)

    def _add(self, inst: Instance) -> None:
        name = inst.card.get("model")
        if inst.component != "worker" or not name:
            return
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name, inst.card)
            asyncio.ensure_future(self._load_tokenizer(entry))
        for other in self.models.values():
            if other is not entry:
                other.instances.pop(inst.id, None)
        entry.instances[inst.id] = inst

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

    async def ready(self, name: str) -> ModelEntry | None:
        entry = self.models.get(name)
        if entry is not None and entry.tokenizer is None:
            entry.tokenizer = await asyncio.to_thread(self.tokenizer_for, entry.card)
        return entry
