"""One request's life after parsing: route, stream from a worker, detokenize, apply stops.

Yields `ChoiceDelta`s; the HTTP layer only formats them. Leaving the iterator early (client
gone, all choices stopped) cancels the worker stream, which aborts the engine request.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dynvllm import protocol
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.routing import request_blocks
from dynvllm.frontend.stops import StopMatcher
from dynvllm.runtime.errors import BadRequest, InstanceLost, RemoteError
from dynvllm.runtime.streams import StreamClientPool, unary

log = logging.getLogger("dynvllm.frontend")


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # [[token_text, logprob, [[top_text, top_logprob], ...]], ...]
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class Generation:
    def __init__(
        self,
        pool: StreamClientPool,
        router: Any,
        entry: ModelEntry,
        prompt_ids: list[int],
        sampling: dict,
        stops: list[str],
        include_stop: bool,
        skip_special: bool,
        metrics: Any,
    ) -> None:
        self.pool, self.router, self.entry = pool, router, entry
        self.prompt_ids, self.sampling = prompt_ids, sampling
        self.n = int(sampling.get("n") or 1)
        self.stops = [StopMatcher(stops, include_stop) for _ in range(self.n)]
        tok = entry.tokenizer
        assert tok is not None
        self.tok = tok
        self.texts = [tok.decode_stream(skip_special) for _ in range(self.n)]
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.request_id = uuid.uuid4().hex
        self.worker_id: str | None = None
        self.metrics = metrics
        self.t_start = time.monotonic()
        self.t_first: float | None = None
        self.lora: str | None = None
        self.block_size = int(entry.card.get("block_size") or 0)
        self.overlap_blocks = 0
        self.blocks = request_blocks(len(prompt_ids), self.block_size)
        self.prefill_worker: str | None = None
        self.prefill_outcome = ""

    def _serving(self, endpoint: str, exclude: set[str]) -> list[str]:
        return [
            i for i, inst in self.entry.instances.items() if endpoint in inst.endpoints and i not in exclude
        ]

    async def _connect(self, endpoint: str) -> tuple[Any, Any, int]:
        """(instance, connection, predicted cached blocks) of the worker the router picks."""
        tried: set[str] = set()
        while True:
            candidates = self._serving(endpoint, tried)
            if not candidates:
                raise InstanceLost(f"no live worker serves {endpoint!r} for model {self.entry.name!r}")
            iid, overlap = self.router.choose(candidates, self.prompt_ids, self.block_size, self.lora)
            inst = self.entry.instances[iid]
            tried.add(iid)
            try:
                return inst, await self.pool.get(inst.id, inst.host, inst.port), overlap
            except InstanceLost:
                self.pool.drop(inst.id)

    async def _prefill(self, decode_overlap: int) -> dict | None:
        """kv_transfer_params from a prefill worker, or None: the decode worker computes the prompt.

        Short prompts, prompts the decode worker mostly caches already, no prefill worker, and
        a prefill that fails all fall back to the decode worker instead of failing the request.
        """
        rs = self.router.settings
        outcome = "remote"
        try:
            if not self._serving(protocol.PREFILL, set()):
                outcome = "no_prefill_worker"
            elif len(self.prompt_ids) < rs.disagg_min_prompt_tokens:
                outcome = "skipped_short"
            elif decode_overlap * self.block_size > rs.disagg_max_cached_fraction * len(self.prompt_ids):
                outcome = "skipped_cached"
            if outcome != "remote":
                return None
            inst, conn, _ = await self._connect(protocol.PREFILL)
            self.router.started(inst.id, self.blocks)
            try:
                req = protocol.generate_request(
                    self.request_id + "-p", self.prompt_ids, self.sampling, self.lora
                )
                result = await unary(conn, protocol.PREFILL, req, timeout=120)
            finally:
                self.router.finished(inst.id, self.blocks)
            self.prefill_worker = inst.id
            params = (result or {}).get("kv_transfer_params")
            if not params:
                outcome = "no_transfer_params"
            return params
        except (TimeoutError, RemoteError) as exc:
            outcome = "failed"
            log.warning("prefill failed, the decode worker computes the prompt: %s", exc)
            return None
        finally:
            self.prefill_outcome = outcome
            self.metrics.prefill.labels(self.entry.name, outcome).inc()

    async def _open(self) -> Any:
        inst, conn, self.overlap_blocks = await self._connect(protocol.GENERATE)
        self.worker_id = inst.id
        kv_params = await self._prefill(self.overlap_blocks)
        req = protocol.generate_request(self.request_id, self.prompt_ids, self.sampling, self.lora)
        if kv_params:
            req["kv_transfer_params"] = kv_params
        return conn.call(protocol.GENERATE, req)

    async def run(self) -> AsyncIterator[ChoiceDelta]:
        done = [False] * self.n
        started = False
        attempts = 0
        while True:
            stream = await self._open()
            self.router.started(self.worker_id, self.blocks)
            try:
                async for d in stream:
                    started = True
                    if "prompt_tokens" in d:
                        self.usage.cached_tokens = int(d.get("cached_tokens") or 0)
                    out = self._delta(d)
                    if out is None:
                        continue
                    if out.finish_reason is not None:
                        done[out.index] = True
                    yield out
                    if all(done):
                        break
                return
            except InstanceLost:
                # Nothing was streamed yet: another worker can take the request unseen.
                attempts += 1
                if started or attempts > 3:
                    raise
                if self.worker_id:
                    self.pool.drop(self.worker_id)
            finally:
                self.router.finished(self.worker_id, self.blocks)
                await stream.aclose()

    def _delta(self, d: dict) -> ChoiceDelta | None:
        i = int(d.get("index", 0))
        if i >= self.n:
            raise BadRequest(f"worker sent choice {i} of {self.n}")
        matcher = self.stops[i]
        if matcher.matched is not None:
            return None
        now = time.monotonic()
        ids = d.get("token_ids") or []
        if ids:
            if self.t_first is None:
                self.t_first = now
                self.metrics.ttft.labels(self.entry.name).observe(now - self.t_start)
            else:
                self.metrics.itl.labels(self.entry.name).observe((now - self._t_last) / len(ids))
            self._t_last = now
        self.usage.completion_tokens += len(ids)
        text = "".join(self.texts[i].step(t) for t in ids)
        emitted = matcher.feed(text)
        finish = d.get("finish_reason")
        if matcher.matched is not None:
            finish = "stop"
        elif finish is not None:
            emitted += matcher.flush()
            finish = "stop" if finish == "abort" else finish
        lps = None
        raw = d.get("logprobs")
        if raw is not None:
            lps = [
                [
                    self.tok.decode([tid], skip_special_tokens=False),
                    lp,
                    [[self.tok.decode([t], skip_special_tokens=False), tlp] for t, tlp in top],
                ]
                for tid, (lp, top) in zip(ids, raw, strict=False)
            ]
        return ChoiceDelta(i, emitted, list(ids), lps, finish)
