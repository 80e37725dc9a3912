"""The one request path every API surface shares: resolve the model, tokenize and budget, admit,
dispatch, post-process, account. A surface turns its own request body into prompts and sampling,
and the deltas this path yields into its own response shape; nothing here knows a wire format.

Hooks are where policy sits without touching a surface: `on_admit` runs once a request is
tokenized and budgeted, before any worker is chosen (quotas, priorities, tenants refuse here by
raising `RequestError`, or wait); `on_end` runs once per request that reached `on_admit`, with its
final status (tracing, billing), also when a hook refused it (then `Admitted.refused` is set).

A model that is known but has no ready worker right now (a worker restarting) is waited for, up
to `worker_wait` seconds, instead of answered with a 404 or a 503 at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from dynvllm import protocol
from dynvllm.frontend.admin import OnDemandAdapters
from dynvllm.frontend.dispatch import Dispatch
from dynvllm.frontend.errors import RequestError, from_remote
from dynvllm.frontend.media import MediaPolicy, fetch_all
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry, ModelRegistry
from dynvllm.frontend.postprocess import ChoiceDelta, PostProcessor, Usage
from dynvllm.frontend.routing import Router
from dynvllm.runtime.errors import RemoteError
from dynvllm.runtime.streams import StreamClientPool

T = TypeVar("T")


class Generation(Protocol):
    """What the path needs of a surface's parsed request (OpenAI's request models have it)."""

    model: str
    n: int
    include_stop_str_in_output: bool
    skip_special_tokens: bool

    def wanted_max_tokens(self) -> int | None: ...
    def sampling(self, max_tokens: int, vocab_size: int, defaults: dict[str, Any] | None = None) -> dict: ...
    def stops(self) -> list[str]: ...


class Part:
    """One prompt of a request and the post-processor of its choices (None for a call that
    answers once, such as an embedding)."""

    __slots__ = ("post", "prompt_ids", "prompt_text")

    def __init__(self, prompt_ids: list[int], prompt_text: str | None, post: PostProcessor | None) -> None:
        self.prompt_ids, self.prompt_text, self.post = prompt_ids, prompt_text, post


async def _deltas(dispatch: Dispatch, post: PostProcessor) -> AsyncIterator[ChoiceDelta]:
    """Client-visible deltas; stops the worker stream as soon as every choice has finished."""
    source = dispatch.stream()
    try:
        async for d in source:
            out = post.feed(d)
            if out is not None:
                yield out
            if post.done:
                return
    finally:
        await source.aclose()


class Admitted:
    """One admitted request: its model, parts (one per prompt) and their dispatches."""

    def __init__(
        self,
        surface: str,
        model: str,
        entry: ModelEntry,
        n: int,
        dispatches: list[Dispatch],
        parts: list[Part],
        client: Mapping[str, str],
    ) -> None:
        self.surface, self.entry, self.n = surface, entry, n
        self.dispatches, self.parts = dispatches, parts
        self.dispatch = dispatches[0]
        self.model = model  # an adapter answers under its own name
        self.request_id = self.dispatch.request_id
        self.created = int(time.time())
        #: The client's request headers, for hooks (tenant keys, trace context).
        self.client = client
        #: Anything hooks want to keep with the request (a trace span, a tenant's name).
        self.notes: dict[str, Any] = {}
        #: When the request reached the path (queue deadlines count from here).
        self.arrived = time.monotonic()
        #: The request's own priority field, if its API has one (lower goes first, as in vLLM).
        self.priority: int | None = None
        #: Set when an `on_admit` hook refused it: it never ran.
        self.refused = False

    def usage(self) -> Usage:
        total = Usage()
        for part in self.parts:
            if part.post is None:
                total.prompt_tokens += len(part.prompt_ids)
                continue
            u = part.post.usage
            total.prompt_tokens += u.prompt_tokens
            total.completion_tokens += u.completion_tokens
            total.cached_tokens += u.cached_tokens
        return total

    def headers(self) -> dict[str, str]:
        return self.dispatch.headers()

    def flush_due(self) -> bool:
        """Whether to send what has been gathered (see `Dispatch.flush_due`); not while every
        choice has finished, as the ending follows at once. Several parts: every time."""
        post = self.parts[0].post
        if len(self.parts) != 1 or post is None:
            return True
        return not post.done and self.dispatch.flush_due()

    async def deltas(self) -> AsyncIterator[tuple[int, Part, ChoiceDelta]]:
        """(client choice index, part, delta) from every part; prompt-major indices."""
        if len(self.parts) == 1:
            part = self.parts[0]
            assert part.post is not None
            async for d in _deltas(self.dispatch, part.post):
                yield d.index, part, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int) -> None:
            part = self.parts[k]
            assert part.post is not None
            try:
                async for d in _deltas(self.dispatches[k], part.post):
                    queue.put_nowait((k * self.n + d.index, part, d))
            except BaseException as exc:
                queue.put_nowait(exc)
                raise
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(k)) for k in range(len(self.parts))]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


AdmitHook = Callable[[Admitted], Awaitable[None]]
EndHook = Callable[[Admitted, str], None]


class RequestPath:
    def __init__(
        self,
        models: ModelRegistry,
        pool: StreamClientPool,
        router: Router,
        metrics: FrontendMetrics,
        media: MediaPolicy,
        on_demand: OnDemandAdapters | None = None,
    ) -> None:
        self.models, self.pool, self.router, self.metrics = models, pool, router, metrics
        self.media, self.on_demand = media, on_demand
        self.on_admit: list[AdmitHook] = []
        self.on_end: list[EndHook] = []
        #: Seconds a request waits for a worker of a known model that has none ready (0: no wait).
        self.worker_wait = 0.0
        #: Requests allowed to wait so at once; more are refused at once.
        self.max_worker_waits = 1000
        self._worker_waits = 0
        #: Set when the frontend drains: requests stop waiting for workers.
        self.closing = False
        #: Whether a client (by its request headers) may use a model name, given the model an
        #: alias names (None otherwise): listings show it only what it may use (tenants' models).
        self.may_use: Callable[[Mapping[str, str], str, str | None], bool] | None = None

    # ---- models ----------------------------------------------------------------------
    def unknown_model(self, name: str) -> RequestError:
        known = ", ".join(sorted(self.models.models)) or "none"
        return RequestError(
            404,
            f"The model {name!r} does not exist. Available models: {known}",
            param="model",
            code="model_not_found",
        )

    def visible(self, client: Mapping[str, str], name: str) -> bool:
        """Whether a listing shows the client this model name (an alias, or an adapter)."""
        return self.may_use is None or self.may_use(client, name, self.models.aliases.get(name))

    def metric_label(self, name: str) -> str:
        """The model label for metrics: a label per name a client sends would grow without bound."""
        return name if self.models.knows(name) else "unknown"

    async def resolve(self, name: str) -> tuple[ModelEntry, str | None]:
        """The model's entry, and the adapter when the name is one (404 when nothing serves it;
        a model seen before waits for a worker, then 503)."""
        entry, lora = await self.models.resolve(name)
        if entry is None and self.on_demand is not None and await self.on_demand.ensure(name):
            entry, lora = await self.models.resolve(name)
        target = self._waitable(name) if entry is None or not entry.servable else None
        if target is not None:
            if await self.wait_worker(target, lambda e: e.servable) is None:
                raise no_worker(name, self.worker_wait)
            entry, lora = await self.models.resolve(name)
        if entry is None or not entry.instances:
            raise self.unknown_model(name)
        return entry, lora

    def _waitable(self, name: str) -> str | None:
        """The model a request for `name` may wait for: one some worker served (by its name, an
        alias or an adapter of it). An alias of a model never served is a 404 at once."""
        if self.worker_wait <= 0:
            return None
        target = self.models.aliases.get(name, name)
        if target not in self.models.models and name in self.models.adapter_sources:
            target = self.models.adapter_sources[name][0]
        return target if self.models.was_served(target) else None

    async def wait_worker(self, model: str, ready: Callable[[ModelEntry], bool]) -> ModelEntry | None:
        """The model's entry once `ready(entry)` holds (a worker registered, woke up ...), or None
        after `worker_wait` seconds, or at once when too many requests wait already."""
        if self.worker_wait <= 0 or self.closing or self._worker_waits >= self.max_worker_waits:
            return None

        def check() -> ModelEntry | None:
            entry = self.models.models.get(model)
            return entry if entry is not None and ready(entry) else None

        self._worker_waits += 1
        waiting = self.metrics.of(self.metrics.waiting_for_worker, model)
        waiting.inc()
        try:
            await self.models.watcher.wait_for(
                lambda _: self.closing or check() is not None, self.worker_wait
            )
        finally:
            self._worker_waits -= 1
            waiting.dec()
        return check()

    async def entry(self, name: str) -> ModelEntry:
        return (await self.resolve(name))[0]

    # ---- checks ------------------------------------------------------------------------
    @staticmethod
    def budget(entry: ModelEntry, prompt_len: int, wanted: int | None) -> int:
        """max_tokens: the request's, else the model's default, else the rest of the context;
        within the cap a generation config may set (as vLLM's server computes it)."""
        ctx = entry.context_length
        if prompt_len >= ctx:
            raise length_error(ctx, prompt_len, None)
        if wanted is None:
            wanted = min(ctx - prompt_len, entry.sampling_defaults.get("max_tokens") or ctx)
        elif prompt_len + wanted > ctx:
            raise length_error(ctx, prompt_len, wanted)
        return min(wanted, entry.max_tokens_cap or wanted)

    @staticmethod
    def check_tokens(entry: ModelEntry, ids: list[int], allow_empty: bool = False) -> None:
        assert entry.tokenizer is not None
        vocab = entry.tokenizer.vocab_size
        if not ids and not allow_empty:
            raise RequestError(400, "the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                400, f"token id {bad[0]} is out of range for a vocabulary of {vocab}", param="prompt"
            )

    async def images(self, entry: ModelEntry, urls: list[str], param: str) -> list[bytes] | None:
        """A request's images, fetched and checked."""
        if not urls:
            return None
        if not entry.card.get("multimodal"):
            raise RequestError(
                400, f"model {entry.name!r} takes text only; it cannot read images", param=param
            )
        return await fetch_all(urls, self.media)

    # ---- admission -----------------------------------------------------------------------
    async def admit(
        self,
        surface: str,
        req: Generation,
        prompts: Callable[[ModelEntry], list[tuple[list[int], str | None]]],
        image_urls: Callable[[], list[str]] | None = None,
        client: Mapping[str, str] | None = None,
        terminal: str = protocol.GENERATE,
    ) -> Admitted:
        """Tokenize, check and budget a parsed request; a `RequestError` says what is wrong.
        `terminal` is the stage that ends the request's chain (declared by roles)."""
        arrived = time.monotonic()
        entry, lora = await self.resolve(req.model)
        self._check_terminal(entry, terminal)
        tok = entry.tokenizer
        assert tok is not None
        urls = image_urls() if image_urls is not None else []
        images = await self.images(entry, urls, "messages") if urls else None
        dispatches, parts = [], []
        for ids, text in prompts(entry):
            self.check_tokens(entry, ids)
            max_tokens = self.budget(entry, len(ids), req.wanted_max_tokens())
            sampling = req.sampling(max_tokens, tok.vocab_size, entry.sampling_defaults)
            dispatches.append(
                Dispatch(self.pool, self.router, entry, ids, sampling, self.metrics, lora, images, terminal)
            )
            post = PostProcessor(
                tok, req.n, len(ids), req.stops(), req.include_stop_str_in_output, req.skip_special_tokens
            )
            parts.append(Part(ids, text, post))
        admitted = Admitted(surface, req.model, entry, req.n, dispatches, parts, client or {})
        admitted.arrived = arrived
        # Not every API has the field (a Generation need not declare it).
        admitted.priority = getattr(req, "priority", None)
        await self._run_admit_hooks(admitted)
        m = self.metrics
        m.of(m.prompt_tokens, admitted.model).inc(sum(len(p.prompt_ids) for p in parts))
        return admitted

    async def admit_call(
        self,
        surface: str,
        model: str,
        prompts: Callable[[ModelEntry], list[list[int]]],
        terminal: str,
        client: Mapping[str, str] | None = None,
    ) -> Admitted:
        """Admit a request whose terminal stage answers once per prompt (embed, score ...); run
        it with `call_all`."""
        arrived = time.monotonic()
        entry, lora = await self.resolve(model)
        self._check_terminal(entry, terminal)
        dispatches, parts = [], []
        for ids in prompts(entry):
            self.check_tokens(entry, ids)
            if len(ids) > entry.context_length:
                raise length_error(entry.context_length, len(ids), None)
            dispatches.append(
                Dispatch(self.pool, self.router, entry, ids, {}, self.metrics, lora, None, terminal)
            )
            parts.append(Part(ids, None, None))
        if not parts:
            raise RequestError(400, "the input is empty", param="input")
        admitted = Admitted(surface, model, entry, 1, dispatches, parts, client or {})
        admitted.arrived = arrived
        await self._run_admit_hooks(admitted)
        m = self.metrics
        m.of(m.prompt_tokens, admitted.model).inc(sum(len(p.prompt_ids) for p in parts))
        return admitted

    async def call_all(self, r: Admitted, options: dict[str, Any], task: str | None = None) -> list[Any]:
        """Each prompt's answer from its terminal worker, in prompt order (calls run together);
        `task` names a pooling task other than the stage's own (classify on the embed stage)."""
        extra = {"task": task} if task is not None else {}
        calls = [
            d.call(protocol.pool_request(f"{d.request_id}-{k}", d.prompt_ids, options, **extra))
            for k, d in enumerate(r.dispatches)
        ]
        return list(await asyncio.gather(*calls))

    async def _run_admit_hooks(self, r: Admitted) -> None:
        for d in r.dispatches:
            d.wait_worker = self.wait_worker
        try:
            for hook in self.on_admit:
                await hook(r)
        except BaseException as exc:
            # Hooks that already took something (a quota, a queue slot) give it back in on_end.
            r.refused = True
            status = str(exc.status) if isinstance(exc, RequestError) else "499"
            for end in self.on_end:
                end(r, status)
            raise

    async def complete(self, r: Admitted, work: Callable[[], Awaitable[T]]) -> T | RequestError:
        """Run an admitted request to its end, accounted (`begin`/`end`): `work`'s result, or the
        error a worker's failure means to the client (a surface renders it in its own shape). A
        client that leaves counts as 499 and the cancellation goes on."""
        self.begin(r)
        status = "200"
        try:
            return await work()
        except RemoteError as exc:
            err = from_remote(exc)
            status = str(err.status)
            return err
        except BaseException:
            status = "499"  # the client went away; the worker stream was cancelled
            raise
        finally:
            self.end(r, status)

    def _check_terminal(self, entry: ModelEntry, terminal: str) -> None:
        if not entry.serves(terminal):
            raise RequestError(
                400,
                f"model {entry.name!r} has no worker that serves {terminal!r} requests "
                f"(its roles: {', '.join(sorted(entry.roles)) or 'none'})",
                param="model",
            )

    def refused(self, model: str, err: RequestError) -> None:
        """Account a request refused before admission."""
        self.metrics.of(self.metrics.requests, self.metric_label(model), str(err.status)).inc()

    # ---- accounting ------------------------------------------------------------------------
    def begin(self, r: Admitted) -> None:
        self.metrics.of(self.metrics.inflight, r.model).inc()

    def end(self, r: Admitted, status: str) -> None:
        """Once per admitted request, whatever its outcome ("200", "503", "499" client gone)."""
        name, m = r.model, self.metrics
        m.of(m.inflight, name).dec()
        m.of(m.requests, name, status).inc()
        # Tokens a cut stream generated were computed all the same: they count.
        for part, dispatch in zip(r.parts, r.dispatches, strict=True):
            if part.post is not None:
                m.of(m.output_tokens, name).inc(part.post.usage.completion_tokens)
                m.of(m.cached_tokens, name).inc(part.post.usage.cached_tokens)
            if dispatch.worker_id:
                m.of(m.routed, name, dispatch.worker_id).inc()
                if dispatch.lora and self.on_demand is not None:
                    self.on_demand.used(dispatch.worker_id, dispatch.lora)
        for hook in self.on_end:
            hook(r, status)


def no_worker(model: str, waited: float) -> RequestError:
    return RequestError(
        503,
        f"no worker of model {model!r} is ready (requests wait up to {waited:g} s for one); try again later",
        "service_unavailable",
        headers={"retry-after": "5"},
    )


def length_error(ctx: int, prompt: int, completion: int | None) -> RequestError:
    if completion is None:
        msg = (
            f"This model's maximum context length is {ctx} tokens. However, your prompt has {prompt} tokens; "
            "shorten it."
        )
    else:
        msg = (
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the prompt, {completion} for the completion). "
            "Reduce the prompt or max_tokens."
        )
    return RequestError(
        400, msg, param="messages" if completion is None else "max_tokens", code="context_length_exceeded"
    )
