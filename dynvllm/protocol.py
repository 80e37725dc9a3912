"""The frontend <-> worker wire format, as plain dicts (msgpack), and pure mappings of it.

Nothing here imports vLLM: the frontend builds requests, the worker turns them into vLLM objects.
"""

from __future__ import annotations

from typing import Any

GENERATE = "generate"
PREFILL = "prefill"
HEALTH = "health"
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
    "skip_special_tokens",
)


def generate_request(
    request_id: str, token_ids: list[int], sampling: dict[str, Any], lora: str | None = None
) -> dict[str, Any]:
    return {"request_id": request_id, "token_ids": token_ids, "sampling": sampling, "lora": lora}


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
