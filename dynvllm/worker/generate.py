"""The generate handler: wire request in, token deltas out, one vLLM request per call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dynvllm import protocol
from dynvllm.runtime.errors import BadRequest
from dynvllm.worker.engine import Tracker


def _check(payload: Any) -> tuple[str, list[int], dict]:
    if not isinstance(payload, dict):
        raise BadRequest("generate expects a map with request_id, token_ids and sampling")
    rid, ids, sampling = payload.get("request_id"), payload.get("token_ids"), payload.get("sampling") or {}
    if not isinstance(rid, str) or not rid:
        raise BadRequest("request_id must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise BadRequest("token_ids must be a non-empty list of non-negative integers")
    if not isinstance(sampling, dict):
        raise BadRequest("sampling must be a map")
    return rid, ids, sampling


def _logprobs(token_ids: list[int], entries: Any, k: int) -> list:
    """[[token_logprob, [[top_id, top_logprob], ...]], ...] for each new token."""
    out = []
    for tid, entry in zip(token_ids, entries or [], strict=False):
        chosen = entry.get(tid)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        top = [[t, float(lp.logprob)] for t, lp in ranked if lp.rank is not None and lp.rank <= k][:k]
        out.append([float(chosen.logprob) if chosen else float("-inf"), top])
    return out


class GenerateHandler:
    def __init__(self, engine: Any, tracker: Tracker) -> None:
        self.engine = engine
        self.tracker = tracker

    async def __call__(self, payload: Any) -> AsyncIterator[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        rid, ids, sampling = _check(payload)
        kv_params = payload.get("kv_transfer_params")
        extra_args = {"kv_transfer_params": kv_params} if kv_params else None
        try:
            params = SamplingParams(
                **protocol.sampling_kwargs(sampling),
                output_kind=RequestOutputKind.DELTA,
                extra_args=extra_args,
            )
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"invalid sampling options: {exc}") from None
        lora = self.tracker.lora_request(payload.get("lora"))
        k = sampling.get("logprobs")
        finished = False
        first = True
        self.tracker.inflight += 1
        try:
            stream = self.engine.generate(
                TokensPrompt(prompt_token_ids=ids), params, request_id=rid, lora_request=lora
            )
            async for out in stream:
                for c in out.outputs:
                    extra: dict[str, Any] = {}
                    if first:
                        extra = {"prompt_tokens": len(ids), "cached_tokens": out.num_cached_tokens or 0}
                        first = False
                    if c.finish_reason is not None:
                        extra["stop_reason"] = c.stop_reason
                        if out.kv_transfer_params:
                            extra["kv_transfer_params"] = out.kv_transfer_params
                    lp = _logprobs(list(c.token_ids), c.logprobs, k) if k is not None else None
                    yield protocol.delta(c.index, list(c.token_ids), c.finish_reason, lp, **extra)
                finished = out.finished
        except ValueError as exc:
            # vLLM validates prompts (length, token ids) with ValueError: the caller's fault.
            raise BadRequest(str(exc)) from None
        finally:
            self.tracker.inflight -= 1
            if not finished:
                await asyncio.shield(self.engine.abort(rid))
