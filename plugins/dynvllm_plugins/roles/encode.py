"""Encode role: runs a multimodal model's vision encoder on its own engine, so image encoding
scales apart from the language model.

The worker side serves `encode`: vLLM (as an encoder-cache producer) runs the request up to the
embeddings and stores them by content hash in the shared --encoder-cache-dir; the language
worker's engine (a consumer) then loads them instead of encoding. The frontend side is
`EncodeStage`: requests without images skip it, and with no encode worker alive (or a failed
hop) the language worker encodes itself. Images already encoded are not sent again (a bounded
content-hash record), and the folder keeps at most --encoder-cache-entries embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynvllm.runtime.errors import BadRequest, RemoteError
from dynvllm.stages import Stage, StageContext
from dynvllm.worker.role import EngineHandle, Role
from dynvllm_plugins.roles import encoder_cache
from dynvllm_plugins.roles.encoder_cache import EncoderCacheSettings
from dynvllm_plugins.roles.encoder_kernels import encoder_kernels

log = logging.getLogger("dynvllm.encode")
ENCODE = "encode"
#: Prefix of the folder `serve` makes for a service with an encode role (removed at its stop).
PRIVATE_FOLDER_PREFIX = "dynvllm-encoder-cache-"


def is_multimodal(model: str) -> bool | None:
    """From a local model folder's config (None when the model is not on disk yet)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return any(k in data for k in ("vision_config", "vision_tower", "visual", "image_token_index"))


#: What an engine that only encodes images needs: no language model and no prefix caching (with no
#: attention layer left, KV-cache set-up fails on it). vLLM's disaggregated-encoder examples also
#: run it eager, as CUDA graph capture looks for the language model's attention layers; the encode
#: role instead compiles as the language workers do and captures no graphs (`encoder_kernels`).
ENCODER_ONLY = {"mm_encoder_only": True, "enable_prefix_caching": False}


class EncodeRole(Role):
    description = "Encode worker: runs the vision encoder of a multimodal model for language workers."
    stage = ENCODE
    terminal = False
    limit = 4096
    folder: str | None = None

    def prepare_service(self, settings: Any) -> Callable[[], None] | None:
        """A private folder the service's encode and language workers share, unless one is given."""
        cfg = settings.plugin(EncoderCacheSettings)
        if cfg.encoder_cache_dir:
            return None  # the operator's: left as it is
        folder = cfg.encoder_cache_dir = tempfile.mkdtemp(prefix=PRIVATE_FOLDER_PREFIX)
        return lambda: shutil.rmtree(folder, ignore_errors=True)

    def engine_overrides(self, settings: Any) -> dict[str, Any]:
        cfg = settings.plugin(EncoderCacheSettings)
        self.limit, self.folder = cfg.encoder_cache_entries, cfg.encoder_cache_dir
        overrides = encoder_cache.engine_overrides(settings, "ec_producer")
        # Compiled as the language workers are, so the embeddings are the ones they would compute.
        kernels = encoder_kernels(settings)
        return {**super().engine_overrides(settings), **overrides, **ENCODER_ONLY, **kernels}

    def check(self, settings: Any) -> None:
        super().check(settings)
        model = settings.engine.model or ""
        if is_multimodal(model) is False:
            raise ValueError(f"the encode role needs a multimodal model; {model} takes text only")
        if settings.worker.engine != "vllm":
            raise ValueError(
                f"the encode role runs vLLM's vision encoder; --engine {settings.worker.engine} has none"
            )
        if not settings.plugin(EncoderCacheSettings).encoder_cache_dir:
            raise ValueError(
                "the encode role needs --encoder-cache-dir: a folder it shares with the language workers "
                "(`serve` picks one when it starts both)"
            )

    def handlers(self, engine: EngineHandle) -> dict[str, Callable]:
        generate = engine.generate
        seen: OrderedDict[str, None] = OrderedDict()

        async def encode(payload: Any) -> dict:
            if not isinstance(payload, dict) or not (payload.get("mm") or {}).get("image"):
                raise BadRequest("encode expects a generate request with images (mm)")
            images = payload["mm"]["image"]
            key = hashlib.sha256(b"".join(hashlib.sha256(i).digest() for i in images)).hexdigest()
            if key in seen:
                seen.move_to_end(key)
                return {"cached": True}
            request = {k: v for k, v in payload.items() if k != "lora"}  # the encoder has no adapters
            request["sampling"] = {"max_tokens": 1, "n": 1, "temperature": 0.0}
            async for _ in generate(request):
                pass
            seen[key] = None
            if len(seen) > self.limit:
                while len(seen) > self.limit:
                    seen.popitem(last=False)
                _trim(self.folder, self.limit)
            return {"cached": False}

        return {ENCODE: encode}

    def request_stage(self, settings: Any) -> Stage:
        return EncodeStage()


def _trim(folder: str | None, limit: int) -> None:
    """Keep the newest `limit` embeddings in the shared folder."""
    if not folder:
        return
    entries = [p for p in Path(folder).iterdir() if p.is_dir()]
    if len(entries) <= limit:
        return
    entries.sort(key=lambda p: p.stat().st_mtime)
    for p in entries[: len(entries) - limit]:
        shutil.rmtree(p, ignore_errors=True)


class EncodeStage(Stage):
    """Before prefill and generation: have an encode worker turn the images into embeddings."""

    name = ENCODE
    order = 10
    metric = "dynvllm_encode"
    metric_help = "Encode hops by outcome (remote, cached, no_images, no_encode_worker, failed)"

    async def run(self, ctx: StageContext) -> str:
        if not ctx.handoff.get("mm"):
            return "no_images"
        if not ctx.serving(ENCODE):
            return "no_encode_worker"
        try:
            result = await ctx.call(ENCODE, ctx.request(suffix="-e"), timeout=120)
        except (RemoteError, TimeoutError) as exc:
            log.warning("encode failed, the language worker encodes the images: %s", exc)
            return "failed"
        return "cached" if (result or {}).get("cached") else "remote"
