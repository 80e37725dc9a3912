"""Dispatch of one request: choose workers, run the stages, open the generate stream, retry.

All of a request's I/O lives here; what the tokens become is `PostProcessor`'s business.
Leaving `stream()` early (client gone, all choices stopped) cancels the worker stream, which
aborts the engine request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from typing import Any

from dynvllm import protocol
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.routing import Router, request_blocks
from dynvllm.router.policies import Pick
from dynvllm.runtime.errors import InstanceLost
from dynvllm.runtime.streams import Connection, StreamClientPool, unary
from dynvllm.stages import StageContext
from dynvllm.tracing import RequestTrace

log = logging.getLogger("dynvllm.frontend")

#: Times a request that has streamed nothing yet is re-sent to another worker.
RETRIES = 3


class SendBatch:
    """When gathered output goes to the client (pure). Output already queued from the worker is
    gathered into one write, but only what was queued when the batch began: what arrives
    meanwhile waits for the next batch, so a frontend that falls behind a fast stream still sends
    in steady steps instead of holding everything back, and a batch holds at most `limit` items.
    `stream` has `taken` (items read) and `queued()` (items waiting)."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._stream: Any = None
        self._end = 0

    def due(self, stream: Any) -> bool:
        if stream is None:
            return True
        if self._stream is stream:
            if stream.taken < self._end:
                return False
            self._stream = None
            return True
        queued = stream.queued()
        if queued == 0:
            return True
        self._stream, self._end = stream, stream.taken + min(queued, self.limit)
        return False


class Dispatch:
    def __init__(
        self,
        pool: StreamClientPool,
        router: Router,
        entry: ModelEntry,
        prompt_ids: list[int],
        sampling: dict[str, Any],
        metrics: FrontendMetrics,
        lora: str | None = None,
        images: list[bytes] | None = None,
        terminal: str = protocol.GENERATE,
    ) -> None:
        self.pool, self.router, self.entry, self.metrics = pool, router, entry, metrics
        #: The endpoint that ends the request's chain and streams its output (declared by roles).
        self.terminal = terminal
        self.lora = lora
        self.prompt_ids, self.sampling = prompt_ids, sampling
        self.request_id = os.urandom(16).hex()  # as uuid4().hex, without building a UUID
        self.block_size = int(entry.card.get("block_size") or 0)
        self.blocks = request_blocks(len(prompt_ids), self.block_size)
        self.worker_id: str | None = None
        self.rank: int | None = None
        #: Images of the request (encoded bytes), sent with every hop.
        self.images = images
        #: vLLM's priority, sent with every hop (set at admission; lower is scheduled earlier).
        self.priority = 0
        #: Workers this request lost; they may stay in discovery until their lease expires.
        self.lost: set[str] = set()
        self.overlap_blocks = 0
        #: Stage name -> "outcome" or "outcome:worker", for the response headers.
        self.stage_outcomes: dict[str, str] = {}
        self.t_start = time.monotonic()
        self._t_last: float | None = None
        self._live: Any = None  # the worker stream being read
        self._sends = SendBatch()
        #: Why the last worker this request lost was lost (for the error when it cannot move on).
        self._lost_why = ""
        #: The request's spans when it is traced (set at admission); None costs nothing.
        self.trace: RequestTrace | None = None
        self._hop_span: Any = None  # the span whose context the next worker call carries
        #: Waits for the model's entry to have a usable worker again when none is left (a worker
        #: restarting): the entry then, or None at the deadline. Set by the request path.
        self.wait_worker: (
            Callable[[str, Callable[[ModelEntry], bool]], Awaitable[ModelEntry | None]] | None
        ) = None

    def _serving(
        self,
        endpoint: str,
        exclude: Collection[str] = frozenset(),
        entry: ModelEntry | None = None,
    ) -> list[str]:
        lora = self.lora
        return [
            i
            for i, inst in (entry or self.entry).instances.items()
            if endpoint in inst.endpoints
            and i not in exclude
            and not inst.card.get("sleeping")
            and (lora is None or lora in (inst.card.get("loras") or ()))
        ]

    async def _connect(self, endpoint: str, prompt: list[int] | None = None) -> tuple[Pick, Connection]:
        if self.trace is None:
            return await self._pick(endpoint, prompt)
        with self.trace.span("route", **{"dynvllm.endpoint": endpoint}) as span:
            pick, conn = await self._pick(endpoint, prompt)
            span.set_attribute("dynvllm.worker", pick.worker)
            return pick, conn

    async def _pick(self, endpoint: str, prompt: list[int] | None = None) -> tuple[Pick, Connection]:
        """The router's pick (instance, predicted cached blocks, rank) and a connection to it."""
        tried: set[str] = set(self.lost)
        prompt = prompt if prompt is not None else self.prompt_ids
        while True:
            candidates = self._serving(endpoint, tried)
            # With no worker left at all (one restarting) the terminal stage waits for one; not when
            # workers are asleep or lack the adapter (an operator's choice), nor for an earlier
            # stage, which has its own fallback.
            if (
                not candidates
                and endpoint == self.terminal
                and self.wait_worker is not None
                and not any(
                    endpoint in inst.endpoints and i not in tried for i, inst in self.entry.instances.items()
                )
            ):
                fresh = await self.wait_worker(
                    self.entry.name, lambda e: bool(self._serving(endpoint, tried, e))
                )
                if fresh is not None:
                    self.entry = fresh
                    continue
            if not candidates:
                what = f"adapter {self.lora!r} of " if self.lora else ""
                raise InstanceLost(f"no live worker serves {endpoint!r} for {what}model {self.entry.name!r}")
            rule = self.entry.card.get("image_placeholder")
            pick = self.router.choose(candidates, prompt, self.block_size, self.lora, self.images, rule)
            inst = self.entry.instances[pick.worker]
            tried.add(pick.worker)
            try:
                return pick, await self.pool.get(inst.id, inst.host, inst.port)
            except InstanceLost:
                self.pool.drop(inst.id)

    async def _stage_call(self, endpoint: str, payload: Any, timeout: float) -> tuple[str, Any]:
        pick, conn = await self._connect(endpoint)
        if pick.rank is not None:
            payload = {**payload, "dp_rank": pick.rank}
        if self.trace is not None and self._hop_span is not None:
            payload = {**payload, "trace": self.trace.carrier(self._hop_span)}
        ticket = self.router.started(pick.worker, self.blocks, pick.rank, pick.keys)
        try:
            return pick.worker, await unary(conn, endpoint, payload, timeout=timeout)
        finally:
            self.router.finished(pick.worker, self.blocks, pick.rank, pick.keys, 0, ticket)

    async def _run_stages(self) -> dict[str, Any]:
        """The chain's stages before generation; what they hand on goes into the generate request."""
        ctx = StageContext(
            self.request_id,
            self.prompt_ids,
            self.sampling,
            self.block_size,
            self.overlap_blocks,
            lambda endpoint: bool(self._serving(endpoint)),
            self._stage_call,
        )
        ctx.handoff.update(self._every_hop())
        for stage in self.entry.stages:
            if self.trace is None:
                outcome = await stage.run(ctx)
            else:
                with self.trace.span(f"stage {stage.name}") as self._hop_span:
                    outcome = await stage.run(ctx)
                self._hop_span = None
            worker = ctx.workers.get(stage.name)
            self.stage_outcomes[stage.name] = f"{outcome}:{worker}" if worker else outcome
            if stage.metric:
                self.metrics.stage(stage.metric, stage.metric_help).labels(self.entry.name, outcome).inc()
        return ctx.handoff

    def _every_hop(self) -> dict[str, Any]:
        """What every worker a request meets must apply: its adapter, its images, its priority."""
        out: dict[str, Any] = {}
        if self.lora:
            out["lora"] = self.lora
        if self.priority:
            out["priority"] = self.priority
        if self.images:
            out["mm"] = {"image": self.images}
        return out

    def _continued(self, done: int) -> dict[str, Any]:
        """Sampling for the rest of a migrated request: the budget less what was generated."""
        s = dict(self.sampling)
        s["max_tokens"] = int(s["max_tokens"]) - done
        if s.get("min_tokens"):
            s["min_tokens"] = max(0, int(s["min_tokens"]) - done)
        s["prompt_logprobs"] = None  # the client has them from the first worker
        return s

    async def stream(self) -> AsyncGenerator[dict, None]:
        """Wire deltas from the generate worker. A worker lost before anything streamed is
        replaced (stages run again for the new one). One lost mid-stream is replaced too, up to
        --migration-limit times: the request goes on elsewhere with the tokens generated so far
        appended to its prompt, so the client's stream continues without a visible break."""
        started = finished = False
        attempts = 0
        migrations = 0
        generated: list[int] = []
        single = int(self.sampling.get("n") or 1) == 1
        limit = self.router.settings.migration_limit if single else 0
        while True:
            prompt = self.prompt_ids + generated if generated else self.prompt_ids
            try:
                pick, conn = await self._connect(self.terminal, prompt)
            except InstanceLost as exc:
                if not generated:
                    raise
                raise self._nowhere_to_go(exc) from None
            self.worker_id, self.overlap_blocks, self.rank, keys = pick
            if generated:
                if len(generated) >= int(self.sampling["max_tokens"]):
                    yield protocol.delta(0, [], "length")  # lost after the last token, before its end
                    return
                # The prompt and the tokens so far are computed again on the new worker.
                handoff = self._every_hop()
                sampling = self._continued(len(generated))
                rid = f"{self.request_id}-m{migrations}"
            else:
                handoff = await self._run_stages()
                sampling, rid = self.sampling, self.request_id
            if self.rank is not None:
                handoff["dp_rank"] = self.rank
            if self.trace is not None:
                self._hop_span = self.trace.generate(self.worker_id)
                handoff["trace"] = self.trace.carrier(self._hop_span)
            stream = conn.call(self.terminal, protocol.generate_request(rid, prompt, sampling, **handoff))
            ticket = self.router.started(self.worker_id, self.blocks, self.rank, keys)
            self._live = stream
            # Output fills KV blocks on the worker too: its load grows a block at a time.
            out, grown, bs = 0, 0, self.block_size
            try:
                async for d in stream:
                    started = True
                    ids = d.get("token_ids")
                    if ids:
                        self._observe_timing(len(ids))
                        if single:
                            generated.extend(ids)
                        out += len(ids)
                        if bs and out >= (grown + 1) * bs:
                            self.router.grow(self.worker_id, self.rank, out // bs - grown, ticket)
                            grown = out // bs
                    # A single choice's final delta ends the request, whatever befalls its
                    # worker before the stream's end frame: migrating then would go on past it.
                    finished = single and d.get("finish_reason") is not None
                    yield d
                return
            except InstanceLost as exc:
                # The pool's connection is not dropped here: a stream fails when its connection
                # has (the pool opens a new one on the next use), and dropping by worker id could
                # fail a newer connection that other requests, a migrated one included, use now.
                self.lost.add(self.worker_id)
                self._lost_why = exc.message
                if finished:
                    return
                if not started:
                    attempts += 1
                    if attempts > RETRIES:
                        raise
                    log.warning(
                        "worker %s lost before streaming (%s); retrying elsewhere",
                        self.worker_id,
                        exc.message,
                    )
                    continue
                if migrations >= limit:
                    raise
                migrations += 1
                self.metrics.migrations.labels(self.entry.name).inc()
                log.warning(
                    "worker %s lost mid-stream (%s); migrating after %d tokens (%d of %d)",
                    self.worker_id,
                    exc.message,
                    len(generated),
                    migrations,
                    limit,
                )
            finally:
                self.router.finished(self.worker_id, self.blocks, self.rank, keys, grown, ticket)
                await stream.aclose()
                if self._hop_span is not None:
                    self._hop_span.end()
                    self._hop_span = None

    async def call(self, payload: dict[str, Any], timeout: float = 120.0) -> Any:
        """A terminal stage that answers once (embed, score ...): the router's pick, one call;
        a worker lost on the way is replaced, as for a stream that sent nothing yet."""
        for attempt in range(RETRIES + 1):
            pick, conn = await self._connect(self.terminal)
            self.worker_id, self.overlap_blocks, self.rank, keys = pick
            body = {**payload, **self._every_hop()}
            body.pop("mm", None)  # pooling calls take token ids only
            if self.trace is not None:
                body["trace"] = self.trace.carrier(self.trace.root)
            if self.rank is not None:
                body["dp_rank"] = self.rank
            ticket = self.router.started(self.worker_id, self.blocks, self.rank, keys)
            try:
                return await unary(conn, self.terminal, body, timeout=timeout)
            except InstanceLost as exc:
                self.lost.add(self.worker_id)
                if attempt == RETRIES:
                    raise
                log.warning(
                    "worker %s lost during a call (%s); retrying elsewhere", self.worker_id, exc.message
                )
            finally:
                self.router.finished(self.worker_id, self.blocks, self.rank, keys, 0, ticket)
        raise AssertionError("unreachable")

    def _nowhere_to_go(self, exc: InstanceLost) -> InstanceLost:
        """The error for a stream lost mid-way that no live worker can continue: with an adapter,
        it says which worker held it and why it went, not only that nothing serves it now."""
        if not self.lora:
            return exc
        lost = ", ".join(sorted(self.lost))
        return InstanceLost(
            f"the stream on adapter {self.lora!r} of model {self.entry.name!r} lost its worker {lost} "
            f"mid-way ({self._lost_why}) and no other live worker holds the adapter to continue it "
            "(an adapter being unloaded there is not loaded anywhere else): load it on another "
            "worker to let such streams move"
        )

    def flush_due(self) -> bool:
        """Whether the client should get what has been gathered from the worker stream now."""
        return self._sends.due(self._live)

    def _observe_timing(self, tokens: int) -> None:
        now = time.monotonic()
        name = self.entry.name
        m = self.metrics
        if self._t_last is None:
            m.of(m.ttft, name).observe(now - self.t_start)
            if self.trace is not None and self._hop_span is not None:
                self.trace.first_token(self._hop_span)
        else:
            m.of(m.itl, name).observe((now - self._t_last) / tokens)
        self._t_last = now

    def headers(self) -> dict[str, str]:
        out = {
            "x-dynvllm-worker": self.worker_id or "",
            **({"x-dynvllm-rank": str(self.rank)} if self.rank is not None else {}),
            "x-dynvllm-predicted-cached-tokens": str(self.overlap_blocks * self.block_size),
        }
        for name, outcome in self.stage_outcomes.items():
            out[f"x-dynvllm-{name}"] = outcome
        return out
