"""The real engine: one vLLM AsyncLLM (its engine core runs in child processes)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from dynvllm import protocol
from dynvllm.router.hashing import image_hash, image_uuid
from dynvllm.runtime.errors import BadRequest
from dynvllm.settings import Settings
from dynvllm.worker.engine import Engine
from dynvllm.worker.stats import SchedulerSnapshot, stat_logger_factory


def _logprobs(token_ids: list[int], entries: Any, k: int) -> list:
    """[[token_logprob, [[top_id, top_logprob], ...]], ...] for each token (None where vLLM has
    none: the first prompt token)."""
    out: list = []
    for tid, entry in zip(token_ids, entries or [], strict=False):
        if entry is None:
            out.append(None)
            continue
        chosen = entry.get(tid)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        top = [[t, float(lp.logprob)] for t, lp in ranked if lp.rank is not None and lp.rank <= k][:k]
        out.append([float(chosen.logprob) if chosen else float("-inf"), top])
    return out


def _decode_images(blobs: list[bytes]) -> Any:
    """PIL images for vLLM's processor (one image alone, as single-image models expect it)."""
    import io

    from PIL import Image

    try:
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    except Exception as exc:
        raise BadRequest(f"an image cannot be decoded: {exc}") from None
    return images[0] if len(images) == 1 else images


def _image_placeholder(model_config: Any) -> dict[str, int] | None:
    """The placeholder token of an image and how many the engine puts per image, for models
    whose config fixes the count (BLIP-2's query tokens, `image_seq_length`); else None."""
    if not model_config.is_multimodal_model:
        return None
    hf = model_config.hf_config
    token = getattr(hf, "image_token_index", None)
    if token is None:
        token = getattr(hf, "image_token_id", None)
    count = getattr(hf, "num_query_tokens", None) or getattr(hf, "image_seq_length", None)
    if token is None or not count:
        return None
    return {"token_id": int(token), "count": int(count)}


def _client_errors() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request's own faults: ValueError, and (newer vLLM) VLLMClientError."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError, TypeError)
    return (ValueError, TypeError, VLLMClientError)


def _vllm_sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Wire sampling options in vLLM's types: structured outputs as StructuredOutputsParams,
    logit bias as {token id: bias} (pairs on the wire, where map keys must be strings)."""
    so = kwargs.pop("structured_outputs", None)
    if so:
        from vllm.sampling_params import StructuredOutputsParams

        kwargs["structured_outputs"] = StructuredOutputsParams(**so)
    bias = kwargs.get("logit_bias")
    if bias:
        kwargs["logit_bias"] = {int(t): float(b) for t, b in bias}
    return kwargs


def sampling_params(req: protocol.GenerateRequest) -> Any:
    """The SamplingParams of a generate request, as vLLM's server builds them for the same body
    (tests/worker/test_engine_request.py compares the two), except `detokenize`: the frontend
    turns token ids into text. Built fresh per request, so vLLM need not deep-copy it
    (`skip_clone`, as its server sets)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra_args = {"kv_transfer_params": req.kv_transfer_params} if req.kv_transfer_params else None
    try:
        kwargs = _vllm_sampling(protocol.sampling_kwargs(req.sampling))
        return SamplingParams(
            **kwargs, output_kind=RequestOutputKind.DELTA, extra_args=extra_args, skip_clone=True
        )
    except _client_errors() as exc:
        raise BadRequest(f"invalid sampling options: {exc}") from None


def _cross_encoder(model_config: Any, tokenizer: Any) -> dict[str, Any]:
    """How vLLM's server prompts a cross-encoder (a one-label classifier scoring text pairs):
    `sep`, the tokenizer's pair encoding (else query + document as one text); `unserved`, what
    the frontend cannot reproduce (None when it can)."""
    from vllm.model_executor.model_loader import get_model_cls
    from vllm.model_executor.models.interfaces import supports_score_template

    unserved = None
    if supports_score_template(get_model_cls(model_config)):
        unserved = "its model's own score template"
    elif "token_type_ids" in (getattr(tokenizer, "model_input_names", None) or ()):
        unserved = "token type ids"
    return {"sep": bool(model_config.use_sep_token), "unserved": unserved}


def _cache_vllm_environment() -> None:
    """Read vLLM's environment settings once from now on, as its engine processes do once
    started: the output handler in this process reads one per generated token
    (VLLM_COMPUTE_NANS_IN_LOGITS, 1.85 us uncached vs 0.33 us cached). Nothing here changes
    VLLM_* variables after the engine has started."""
    from vllm import envs

    enable = getattr(envs, "enable_envs_cache", None)  # vLLM >= 0.11
    if enable is not None:
        enable()


class VllmEngine(Engine):
    kind = "vllm"

    def __init__(self) -> None:
        self.llm: Any = None
        self.local_model = ""
        self._tokenizer: str | None = None
        self._loras: dict[str, Any] = {}  # name -> LoRARequest
        self._lora_ids = 0
        self._lora_inflight: dict[str, int] = {}
        self._lora_closing: set[str] = set()
        self._pooling_tasks: list[str] | None = None
        self._cross_encoder: dict[str, Any] | None = None

    def check_args(self, settings: Settings) -> None:
        from dynvllm.worker.engine_args import parse_engine_args

        parse_engine_args(settings)

    def local_ranks(self, settings: Settings) -> range:
        from dynvllm.worker.engine_args import parse_engine_args

        args = parse_engine_args(settings)
        size = args.data_parallel_size
        local = args.data_parallel_size_local or size
        first = args.data_parallel_start_rank or 0
        return range(first, first + local)

    def start(
        self,
        settings: Settings,
        overrides: dict[str, Any],
        snapshot: SchedulerSnapshot,
        kv_endpoint: str | None,
        kv_replay: str | None,
    ) -> None:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from dynvllm.models.hub import resolve_model
        from dynvllm.worker.engine_args import engine_start_args, vllm_config

        eng = settings.engine
        assert eng.model
        self.local_model = resolve_model(eng.model, eng.revision)
        self._tokenizer = eng.tokenizer
        args = engine_start_args(settings, self.local_model, overrides, kv_endpoint, kv_replay)
        if not args.served_model_name:
            args.served_model_name = [eng.served_model_name or eng.model]
        # Built as vLLM's OpenAI server builds its engine, so a user gets the engine `vllm serve` gives.
        self.llm = AsyncLLM.from_vllm_config(
            vllm_config(args),
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[stat_logger_factory(snapshot)],
            enable_log_requests=args.enable_log_requests,
            disable_log_stats=args.disable_log_stats,
        )
        _cache_vllm_environment()

    def card(self) -> dict[str, Any]:
        cfg = self.llm.vllm_config
        return {
            "path": self.local_model,
            "tokenizer": self._tokenizer or self.local_model,
            "context_length": cfg.model_config.max_model_len,
            "block_size": cfg.cache_config.block_size,
            "kv_blocks": getattr(cfg.cache_config, "num_gpu_blocks", None),
            "max_num_seqs": cfg.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "multimodal": bool(cfg.model_config.is_multimodal_model),
            # How the frontend places image tokens to predict the engine's block keys.
            "image_placeholder": _image_placeholder(cfg.model_config),
            # What `vllm serve` uses where a request leaves a field out: the model's
            # generation_config.json (Qwen3: temperature 0.6, top_k 20, top_p 0.95), or nothing
            # with --generation-config vllm; --override-generation-config applies.
            "sampling_defaults": (defaults := cfg.model_config.get_diff_sampling_param()),
            # A generation config given as a folder caps max_tokens (vLLM's server does the same).
            "max_tokens_cap": (
                defaults.get("max_tokens")
                if cfg.model_config.generation_config not in ("auto", "vllm")
                else (cfg.model_config.override_generation_config or {}).get("max_new_tokens")
            ),
            **self._ranks_card(cfg.parallel_config),
            # The pooling tasks its model serves (embed, classify ...), once the canary has asked.
            **({"pooling_tasks": self._pooling_tasks} if self._pooling_tasks is not None else {}),
            # A classifier's label names by class index, for /classify (vLLM reads the same).
            **({"labels": self._labels(cfg)} if "classify" in (self._pooling_tasks or ()) else {}),
            # A one-label classifier scores (query, document) pairs: how vLLM builds their prompts.
            **({"cross_encoder": self._cross_encoder} if self._cross_encoder is not None else {}),
        }

    @staticmethod
    def _labels(cfg: Any) -> dict[str, str]:
        id2label = getattr(cfg.model_config.hf_config, "id2label", None) or {}
        return {str(k): str(v) for k, v in id2label.items()}

    @staticmethod
    def _ranks_card(pc: Any) -> dict[str, Any]:
        if pc.data_parallel_size <= 1:
            return {}
        # The leader routes to every rank, its own and those headless hosts run for it.
        return {
            "dp_size": pc.data_parallel_size,
            "dp_start_rank": 0,
            "dp_address": pc.data_parallel_master_ip,
            "dp_rpc_port": pc.data_parallel_rpc_port,
        }

    async def generate(self, payload: Any) -> AsyncIterator[dict]:
        """One vLLM request, its output deltas mapped to wire deltas as they come."""
        from vllm.inputs import TokensPrompt

        req = protocol.parse_generate(payload)
        params = sampling_params(req)
        rid, n_prompt = req.request_id, len(req.token_ids)
        k = req.sampling.get("logprobs")
        pk = req.sampling.get("prompt_logprobs")
        lora = self._lora_request(req.lora)  # None exactly when req.lora is
        if req.lora is not None:
            self._lora_inflight[req.lora] = self._lora_inflight.get(req.lora, 0) + 1
        finished = False
        first = True
        prompt = TokensPrompt(prompt_token_ids=req.token_ids)
        if req.images:
            prompt["multi_modal_data"] = {"image": _decode_images(req.images)}
            # Images named by their content hash: the engine keys their blocks (and reports them
            # in KV events) by the identifier the frontend computes from the same bytes.
            prompt["multi_modal_uuids"] = {"image": [image_uuid(image_hash(b)) for b in req.images]}
        try:
            stream = self.llm.generate(
                prompt,
                params,
                request_id=rid,
                lora_request=lora,
                data_parallel_rank=req.dp_rank,
                trace_headers=req.trace,  # vLLM's spans join the request's trace (--otlp-traces-endpoint)
                # Ordered by it with --scheduling-policy priority; under fcfs vLLM ignores it.
                priority=req.priority,
            )
            async for out in stream:
                for c in out.outputs:
                    extra: dict[str, Any] = {}
                    if first:
                        # The engine's processor may add tokens (image placeholders): count its prompt.
                        n_prompt = len(out.prompt_token_ids or req.token_ids)
                        extra = {"prompt_tokens": n_prompt, "cached_tokens": out.num_cached_tokens or 0}
                        if pk is not None:
                            k_prompt = pk if pk >= 0 else 1 << 30
                            extra["prompt_logprobs"] = _logprobs(req.token_ids, out.prompt_logprobs, k_prompt)
                        first = False
                    if c.finish_reason is not None:
                        extra["stop_reason"] = c.stop_reason
                        if out.kv_transfer_params:
                            extra["kv_transfer_params"] = out.kv_transfer_params
                    ids = list(c.token_ids)
                    lp = _logprobs(ids, c.logprobs, k) if k is not None else None
                    yield protocol.delta(c.index, ids, c.finish_reason, lp, **extra)
                finished = out.finished
        except _client_errors() as exc:
            # vLLM validates prompts and constraints (length, token ids, grammars): the caller's fault.
            raise BadRequest(str(exc)) from None
        finally:
            if req.lora is not None:
                self._lora_inflight[req.lora] -= 1
            if not finished:
                await asyncio.shield(self.llm.abort(rid))

    async def pool(self, payload: Any, task: str) -> dict[str, Any]:
        """One pooling request (embed, classify ...) on an engine started with a pooling runner."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        req = protocol.parse_pool(payload, task)
        if self.llm.vllm_config.model_config.runner_type != "pooling":
            raise BadRequest(f"this worker's engine generates; {task!r} needs a pooling engine")
        try:
            params = PoolingParams(task=task, **req.options)
        except _client_errors() as exc:
            raise BadRequest(f"invalid pooling options: {exc}") from None
        lora = self._lora_request(req.lora)
        out = None
        prompt = TokensPrompt(prompt_token_ids=req.token_ids)
        try:
            # FINAL_ONLY: the one output is the last.
            async for item in self.llm.encode(prompt, params, req.request_id, lora_request=lora):
                out = item
        except _client_errors() as exc:
            raise BadRequest(str(exc)) from None
        assert out is not None
        data = out.outputs.data
        return {
            "data": data.tolist() if hasattr(data, "tolist") else list(data),
            "prompt_tokens": len(out.prompt_token_ids or req.token_ids),
            "cached_tokens": int(getattr(out, "num_cached_tokens", 0) or 0),
        }

    async def clear_kv(self) -> None:
        if await self.llm.reset_prefix_cache() is False:  # older vLLM returns None
            raise BadRequest("vLLM could not clear the prefix cache now (requests still hold blocks); retry")

    async def sleep(self, level: int) -> None:
        await self.llm.sleep(level)

    async def wake(self) -> None:
        await self.llm.wake_up()

    def adapter_capacity(self) -> int:
        lora = getattr(self.llm.vllm_config, "lora_config", None)
        return int(lora.max_loras) if lora is not None else 0

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        req = LoRARequest(name, self._lora_ids, path)
        try:
            await self.llm.add_lora(req)
        except Exception as exc:  # a bad adapter (rank, modules, files): the caller's to fix
            raise BadRequest(f"vLLM could not load adapter {name!r} from {path}: {exc}") from None
        self._loras[name] = req

    async def unload_adapter(self, name: str) -> None:
        self._lora_closing.add(name)
        try:
            while self._lora_inflight.get(name):
                await asyncio.sleep(0.05)
            req = self._loras.pop(name)
            await self.llm.remove_lora(req.lora_int_id)
        finally:
            self._lora_closing.discard(name)

    def _lora_request(self, name: str | None) -> Any:
        if name is None:
            return None
        req = self._loras.get(name)
        if req is None or name in self._lora_closing:
            held = sorted(set(self._loras) - self._lora_closing)
            raise BadRequest(f"adapter {name!r} is not loaded on this worker (it holds {held})")
        return req

    async def canary(self) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rid = f"canary-{os.getpid()}-{time.monotonic()}"
        task = await self._pooling_task()
        if task is not None:
            from vllm import PoolingParams

            async for _ in self.llm.encode(TokensPrompt(prompt_token_ids=[0]), PoolingParams(task=task), rid):
                pass
            return
        params = SamplingParams(max_tokens=1, detokenize=False)
        async for _ in self.llm.generate(TokensPrompt(prompt_token_ids=[0]), params, request_id=rid):
            pass

    async def _pooling_task(self) -> str | None:
        """A task a pooling engine supports (its canary runs it), or None for a generating one."""
        if self.llm.vllm_config.model_config.runner_type != "pooling":
            return None
        tasks = list(await self.llm.get_supported_tasks())
        self._pooling_tasks = sorted(tasks)
        mc = self.llm.vllm_config.model_config
        if "classify" in tasks and getattr(mc.hf_config, "num_labels", 0) == 1:
            self._cross_encoder = _cross_encoder(mc, self.llm.tokenizer)
        return next((t for t in ("embed", "classify", "score") if t in tasks), tasks[0] if tasks else "embed")

    @property
    def errored(self) -> bool:
        return bool(self.llm is not None and self.llm.errored)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
