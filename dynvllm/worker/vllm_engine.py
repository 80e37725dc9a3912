"""The real engine: one vLLM AsyncLLM (its engine core runs in child processes)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

from dynvllm.settings import Settings
from dynvllm.worker.engine import Engine
from dynvllm.worker.generate import GenerateHandler
from dynvllm.worker.stats import SchedulerSnapshot, stat_logger_factory


class VllmEngine(Engine):
    kind = "vllm"

    def __init__(self) -> None:
        super().__init__()
        self.llm: Any = None
        self.local_model = ""
        self._handler: GenerateHandler | None = None
        self._tokenizer: str | None = None

    def check_args(self, settings: Settings) -> None:
        from dynvllm.worker.engine_args import parse_engine_args

        parse_engine_args(settings)

    def start(
        self,
        settings: Settings,
        overrides: dict[str, Any],
        snapshot: SchedulerSnapshot,
        kv_endpoint: str | None,
        kv_replay: str | None,
    ) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        from dynvllm.models.hub import resolve_model
        from dynvllm.worker.engine_args import parse_engine_args

        eng = settings.engine
        assert eng.model
        self.local_model = resolve_model(eng.model, eng.revision)
        self._tokenizer = eng.tokenizer
        args = parse_engine_args(settings, {"model": self.local_model, **overrides})
        if kv_endpoint and args.enable_prefix_caching and args.kv_events_config is None:
            from vllm.config import KVEventsConfig

            args.kv_events_config = KVEventsConfig(
                enable_kv_cache_events=True,
                publisher="zmq",
                topic="kv",
                endpoint=kv_endpoint,
                replay_endpoint=kv_replay,
            )
        if not args.served_model_name:
            args.served_model_name = [eng.served_model_name or eng.model]
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(snapshot)])
        self._handler = GenerateHandler(self.llm, self.tracker)

    def card(self) -> dict[str, Any]:
        cfg = self.llm.vllm_config
        return {
            "path": self.local_model,
            "tokenizer": self._tokenizer or self.local_model,
            "context_length": cfg.model_config.max_model_len,
            "block_size": cfg.cache_config.block_size,
            "kv_blocks": getattr(cfg.cache_config, "num_gpu_blocks", None),
        }

    def generate(self, payload: Any) -> AsyncIterator[dict]:
        assert self._handler is not None
        return self._handler(payload)

    async def canary(self) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rid = f"canary-{os.getpid()}-{time.monotonic()}"
        async for _ in self.llm.generate(
            TokensPrompt(prompt_token_ids=[0]), SamplingParams(max_tokens=1, detokenize=False), request_id=rid
        ):
            pass

    @property
    def errored(self) -> bool:
        return bool(self.llm is not None and self.llm.errored)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
