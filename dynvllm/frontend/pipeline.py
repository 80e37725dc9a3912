"""One request's life after parsing: route, stream from a worker, detokenize, apply stops.

Yields `ChoiceDelta`s; the HTTP layer only formats them. Leaving the iterator early (client
gone, all choices stopped) cancels the worker stream, which aborts the engine request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from dynvllm import protocol
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.routing import request_blocks
from dynvllm.frontend.stops import StopMatcher
from dynvllm.runtime.errors import BadRequest, InstanceLost
from dynvllm.runtime.streams import StreamClientPool


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None  # [[token_text, logprob, [[top_text, top_logprob], ...]], ...]
    finish_reason: Optional[str] = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Generation:
    def __init__(self, pool: StreamClientPool, router: Any, entry: ModelEntry, prompt_ids: list[int],
                 sampling: dict, stops: list[str], include_stop: bool, skip_special: bool, metrics: Any) -> None:
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
        self.worker_id: Optional[str] = None
        self.metrics = metrics
        self.t_start = time.monotonic()
        self.t_first: Optional[float] = None
        self.lora: Optional[str] = None
        self.block_size = int(entry.card.get("block_size") or 0)
        self.overlap_blocks = 0
        self.blocks = request_blocks(len(prompt_ids), self.block_size)

    def _pick(self, exclude: set[str]) -> Any:
        candidates = [i for i in self.entry.instances if i not in exclude]
        if not candidates:
            raise InstanceLost(f"no live worker serves model {self.entry.name!r}")
        iid, self.overlap_blocks = self.router.choose(candidates, self.prompt_ids, self.block_size, self.lora)
        return self.entry.instances[iid]

    async def _open(self) -> Any:
        tried: set[str] = set()
        while True:
            inst = self._pick(tried)
            tried.add(inst.id)
            try:
                conn = await self.pool.get(inst.id, inst.host, inst.port)
            except InstanceLost:
                self.pool.drop(inst.id)
                continue
            self.worker_id = inst.id
            req = protocol.generate_request(self.request_id, self.prompt_ids, self.sampling)
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

    def _delta(self, d: dict) -> Optional[ChoiceDelta]:
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
            lps = [[self.tok.decode([tid], skip_special_tokens=False), lp,
                    [[self.tok.decode([t], skip_special_tokens=False), tlp] for t, tlp in top]]
                   for tid, (lp, top) in zip(ids, raw)]
        return ChoiceDelta(i, emitted, list(ids), lps, finish)
