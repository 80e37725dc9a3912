"""The frontend <-> worker wire format, as plain dicts (msgpack), and pure mappings of it.

Nothing here imports vLLM: the frontend builds requests, the worker turns them into vLLM objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynvllm.runtime.errors import BadRequest
from dynvllm.tracing import check_trace

# Every chain of stages ends in this endpoint: it streams the tokens the client sees.
GENERATE = "generate"
HEALTH = "health"
# Worker endpoints for LoRA adapters (admin calls; the payload carries the admin token).
LORA_LOAD, LORA_UNLOAD, LORA_LIST = "lora_load", "lora_unload", "lora_list"
CLEAR_KV, SLEEP, WAKE = "clear_kv", "sleep", "wake"
STATS = "stats"

# Sampling options the worker forwards to vLLM's SamplingParams, by the same name.
SAMPLING_FIELDS = (
    "n",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "structured_outputs",
    "skip_special_tokens",
)


@dataclass(frozen=True)
class GenerateRequest:
    """A generate call as an engine receives it, checked."""

    request_id: str
    token_ids: list[int]
    sampling: dict[str, Any]
    # What earlier stages handed on (e.g. a KV connector's transfer parameters), passed to the engine.
    kv_transfer_params: dict[str, Any] | None = None
    #: The LoRA adapter to apply, by name (None: the base model).
    lora: str | None = None
    #: The data-parallel rank to run on (None: the engine balances its ranks itself).
    dp_rank: int | None = None
    #: Encoded images (PNG, JPEG ... bytes as the client sent them), in prompt order.
    images: list[bytes] | None = None
    #: The trace the request belongs to, as W3C headers (traceparent, tracestate): the engine's
    #: own spans join it (vLLM's trace_headers). See `dynvllm.tracing`.
    trace: dict[str, str] | None = None
    #: vLLM's request priority (lower is scheduled earlier; only an engine started with
    #: --scheduling-policy priority orders by it).
    priority: int = 0


def generate_request(request_id: str, token_ids: list[int], sampling: dict[str, Any], **handoff: Any) -> dict:
    return {"request_id": request_id, "token_ids": token_ids, "sampling": sampling, **handoff}


def parse_generate(payload: Any) -> GenerateRequest:
    """Check a wire generate request; what is wrong is the caller's fault (BadRequest)."""
    if not isinstance(payload, dict):
        raise BadRequest("generate expects a map with request_id, token_ids and sampling")
    rid, ids = payload.get("request_id"), payload.get("token_ids")
    sampling = payload.get("sampling") or {}
    if not isinstance(rid, str) or not rid:
        raise BadRequest("request_id must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise BadRequest("token_ids must be a non-empty list of non-negative integers")
    if not isinstance(sampling, dict):
        raise BadRequest("sampling must be a map")
    unknown = set(payload) - _REQUEST_KEYS
    if unknown:
        raise BadRequest(f"generate request has fields this worker does not implement: {sorted(unknown)}")
    kv = payload.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        raise BadRequest("kv_transfer_params must be a map")
    lora = payload.get("lora")
    if lora is not None and not isinstance(lora, str):
        raise BadRequest("lora must be an adapter name")
    rank = payload.get("dp_rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise BadRequest("dp_rank must be a non-negative integer")
    mm = payload.get("mm")
    images = None
    if mm is not None:
        images = mm.get("image") if isinstance(mm, dict) else None
        if (
            not isinstance(mm, dict)
            or set(mm) - {"image"}
            or not isinstance(images, list)
            or not all(isinstance(i, bytes) for i in images)
        ):
            raise BadRequest("mm must be a map {'image': [image bytes, ...]}")
    priority = payload.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise BadRequest("priority must be an integer")
    return GenerateRequest(rid, ids, sampling, kv, lora, rank, images, _trace(payload), priority)


def _trace(payload: dict) -> dict[str, str] | None:
    try:
        return check_trace(payload.get("trace"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


_REQUEST_KEYS = {
    "request_id",
    "token_ids",
    "sampling",
    "kv_transfer_params",
    "lora",
    "dp_rank",
    "mm",
    "trace",
    "priority",
}


# Options a pooling call (embed, classify, score ...) forwards to vLLM's PoolingParams.
POOLING_FIELDS = ("dimensions", "use_activation")


@dataclass(frozen=True)
class PoolRequest:
    """A pooling call (a terminal stage that answers once) as an engine receives it, checked."""

    request_id: str
    token_ids: list[int]
    #: vLLM's pooling task: "embed", "classify", "score", "token_embed" ...
    task: str
    options: dict[str, Any]
    lora: str | None = None
    dp_rank: int | None = None
    trace: dict[str, str] | None = None


def pool_request(request_id: str, token_ids: list[int], options: dict[str, Any], **handoff: Any) -> dict:
    return {"request_id": request_id, "token_ids": token_ids, "options": options, **handoff}


def parse_pool(payload: Any, task: str) -> PoolRequest:
    """Check a wire pooling request for `task` (the role's); what is wrong is the caller's fault."""
    if not isinstance(payload, dict):
        raise BadRequest("a pooling call expects a map with request_id, token_ids and options")
    rid, ids = payload.get("request_id"), payload.get("token_ids")
    options = payload.get("options") or {}
    if not isinstance(rid, str) or not rid:
        raise BadRequest("request_id must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise BadRequest("token_ids must be a non-empty list of non-negative integers")
    if not isinstance(options, dict) or set(options) - set(POOLING_FIELDS):
        raise BadRequest(f"options must be a map of {', '.join(POOLING_FIELDS)}")
    # "task": the pooling task the caller asks of a role serving several (the role reads it).
    unknown = set(payload) - {"request_id", "token_ids", "options", "lora", "dp_rank", "trace", "task"}
    if unknown:
        raise BadRequest(f"pooling request has fields this worker does not implement: {sorted(unknown)}")
    lora, rank = payload.get("lora"), payload.get("dp_rank")
    if lora is not None and not isinstance(lora, str):
        raise BadRequest("lora must be an adapter name")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise BadRequest("dp_rank must be a non-negative integer")
    options = {k: v for k, v in options.items() if v is not None}
    return PoolRequest(rid, ids, task, options, lora, rank, _trace(payload))


def sampling_kwargs(sampling: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments from a wire request; unknown keys are a caller bug."""
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unsupported sampling options: {sorted(unknown)}")
    kwargs = {k: v for k, v in sampling.items() if v is not None}
    # The frontend detokenizes and applies stop strings; the worker sends token ids only.
    kwargs["detokenize"] = False
    return kwargs


def delta(
    index: int,
    token_ids: list[int],
    finish_reason: str | None = None,
    logprobs: list | None = None,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "token_ids": token_ids, "finish_reason": finish_reason}
    if logprobs is not None:
        out["logprobs"] = logprobs
    out.update(extra)
    return out
