"""Embedding role: a vLLM engine with a pooling runner; its `embed` stage ends a request's chain
and answers once (`dynvllm serve embed --model M` serves `/v1/embeddings` on its own).

A sequence-classification checkpoint (`*ForSequenceClassification`) runs as vLLM runs it, with
the classify task: the same stage then answers `/classify`, and, for a one-label classifier (a
cross-encoder), `/score` and `/rerank` with each (query, document) pair as one prompt. Each call
names its pooling task (embed unless it says otherwise); the engine refuses a task its model lacks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynvllm.runtime.errors import BadRequest
from dynvllm.worker.role import EngineHandle, Role

EMBED = "embed"
CLASSIFY = "classify"
#: The pooling tasks a call may name.
TASKS = (EMBED, CLASSIFY)


def is_classifier(model: str | None) -> bool:
    """Whether the model's config.json (a local folder's, or the hub cache's) names only
    sequence-classification architectures, which vLLM runs with the classify task."""
    if not model:
        return False
    config = Path(model) / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a hub id: vLLM judges the model itself
            return False
        if not isinstance(cached, str):
            return False
        config = Path(cached)
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(archs) and all(str(a).endswith("ForSequenceClassification") for a in archs)


class EmbedRole(Role):
    standalone = True
    description = (
        "Pooling worker: a vLLM engine with a pooling runner (serves /v1/embeddings, or /classify "
        "for a sequence-classification model, and /score for a one-label one)."
    )
    stage = EMBED

    def engine_overrides(self, settings: Any) -> dict[str, Any]:
        # vLLM turns a generative checkpoint into an embedding model (last-token pooling) unless
        # the checkpoint is a pooling one already; a classifier keeps vLLM's own choice
        # (classify); a --runner/--convert of the user's wins.
        argv = settings.vllm_argv()
        overrides = dict(super().engine_overrides(settings))
        if "--runner" not in argv:
            overrides["runner"] = "pooling"
        if "--convert" not in argv and not is_classifier(settings.engine.model):
            overrides["convert"] = "embed"
        return overrides

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        pool = engine.pool
        assert pool is not None

        async def embed(payload: Any) -> dict:
            task = payload.get("task", EMBED) if isinstance(payload, dict) else EMBED
            if task not in TASKS:
                raise BadRequest(f"pooling task {task!r} is not one of {list(TASKS)}")
            return await pool(payload, task)

        return {EMBED: embed}
