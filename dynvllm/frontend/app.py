"""HTTP routes of the OpenAI-compatible API (Starlette): one request path for every endpoint.

A request is parsed and tokenized by its endpoint's formatter, dispatched (`Dispatch`: workers,
stages, streams), post-processed (`PostProcessor`: text, stops, logprobs, usage) and formatted.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynvllm import registry
from dynvllm.frontend import openai_api as oa
from dynvllm.frontend.admin import AdminCalls, OnDemandAdapters
from dynvllm.frontend.auth import OPEN_PATHS, ApiKeyMiddleware
from dynvllm.frontend.dispatch import Dispatch
from dynvllm.frontend.event_stream import EventStream, Last
from dynvllm.frontend.formatters import ChatFormatter, CompletionFormatter, Formatter, Part
from dynvllm.frontend.media import MediaPolicy, fetch_all
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry, ModelRegistry
from dynvllm.frontend.postprocess import ChoiceDelta, PostProcessor, Usage
from dynvllm.frontend.routing import Router
from dynvllm.runtime.errors import BadRequest, InstanceLost, RemoteError
from dynvllm.runtime.streams import StreamClientPool
from dynvllm.settings import FrontendSettings


def _error(exc: oa.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


_json = msgspec.json.Encoder().encode


def _sse(obj: Any) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def _early_error(exc: Exception) -> tuple[int, bytes] | None:
    """A streaming request that failed before its first event: its status and JSON error."""
    if isinstance(exc, oa.APIError):
        return exc.status, _json(exc.body())
    return None


def _remote_to_api(exc: RemoteError) -> oa.APIError:
    if isinstance(exc, BadRequest):
        return oa.APIError(400, exc.message)
    if isinstance(exc, InstanceLost):
        return oa.APIError(503, f"no worker could serve the request: {exc.message}", "service_unavailable")
    return oa.APIError(500, f"worker error ({exc.kind}): {exc.message}", "internal_error")


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


class _Request:
    """One admitted request: its formatter, parsed body, parts (one per prompt) and shaper."""

    def __init__(self, fmt: Formatter, req: Any, dispatches: list[Dispatch], parts: list[Part]) -> None:
        self.fmt, self.req, self.dispatches, self.parts = fmt, req, dispatches, parts
        self.dispatch = dispatches[0]
        self.model = req.model  # an adapter answers under its own name
        self.id = fmt.id_prefix + self.dispatch.request_id
        self.created = int(time.time())
        self.n = req.n
        self.shaper = fmt.shaper(req, parts, req.n)

    def usage(self) -> dict:
        total = Usage()
        for part in self.parts:
            u = part.post.usage
            total.prompt_tokens += u.prompt_tokens
            total.completion_tokens += u.completion_tokens
            total.cached_tokens += u.cached_tokens
        return total.as_dict()

    def flush_due(self) -> bool:
        """Whether to send what has been gathered (see `Dispatch.flush_due`); not while every
        choice has finished, as the ending follows at once. Several parts: every time."""
        if len(self.parts) != 1:
            return True
        return not self.parts[0].post.done and self.dispatch.flush_due()

    async def deltas(self) -> AsyncIterator[tuple[int, Part, ChoiceDelta]]:
        """(client choice index, part, delta) from every part; prompt-major indices."""
        if len(self.parts) == 1:
            part = self.parts[0]
            async for d in _deltas(self.dispatch, part.post):
                yield d.index, part, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int) -> None:
            part = self.parts[k]
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


class FrontendApp:
    def __init__(
        self,
        models: ModelRegistry,
        pool: StreamClientPool,
        router: Router,
        settings: FrontendSettings,
        admin_token: str | None = None,
        lora_on_demand: bool = False,
    ) -> None:
        self.models, self.pool, self.router = models, pool, router
        self.max_body = settings.max_request_bytes
        self.admin = AdminCalls(models, pool, admin_token)
        self.on_demand = (
            OnDemandAdapters(models, pool, router.inflight, admin_token) if lora_on_demand else None
        )
        self.metrics = FrontendMetrics()
        self.metrics.watch_workers(
            lambda: [
                (e.name, inst.role, int(inst.card.get("restarts") or 0))
                for e in list(self.models.models.values())
                for inst in list(e.instances.values())
            ]
        )
        self.draining = False
        self.chat_fmt = ChatFormatter(
            _load_parser(registry.TOOL_PARSERS, settings.tool_call_parser),
            _load_parser(registry.REASONING_PARSERS, settings.reasoning_parser),
            settings.mm_prompt_template,
        )
        self.media = MediaPolicy.from_settings(settings)
        self.completion_fmt = CompletionFormatter()
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/v1/load_lora_adapter", self.load_lora, methods=["POST"]),
            Route("/clear_kv_blocks", self.clear_kv, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/live", self.live, methods=["GET"]),
            Route("/metrics", self.prom, methods=["GET"]),
        ]
        middleware = []
        keys = settings.api_keys()
        if keys:
            middleware.append(Middleware(ApiKeyMiddleware, keys=keys, open_paths=OPEN_PATHS))
        self.app = Starlette(
            routes=routes,
            middleware=middleware,
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )

    # ---- simple endpoints ----------------------------------------------------------
    @staticmethod
    def _model_card(name: str, e: ModelEntry) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "dynvllm",
            "root": e.card.get("source") or name,
            "parent": None,
            "max_model_len": e.context_length,
        }

    def _cards(self) -> dict[str, dict]:
        # A model is listed once a worker that serves requests end to end (generate) is registered:
        # clients that poll /v1/models for readiness never see a model they cannot use yet.
        cards = {name: self._model_card(name, e) for name, e in self.models.models.items() if e.servable}
        for name, (base, _) in self.models.adapters().items():
            cards.setdefault(name, {**self._model_card(name, base), "root": name, "parent": base.name})
        for alias, model in self.models.aliases.items():
            if model in cards:
                cards.setdefault(alias, {**cards[model], "id": alias})
        return cards

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [c for _, c in sorted(self._cards().items())]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        card = self._cards().get(name)
        if card is None:
            return _error(self._unknown_model(name))
        return JSONResponse(card)

    async def load_lora(self, request: Request) -> Response:
        """vLLM's dynamic LoRA route: load on every worker of the base model."""
        return await self.admin.lora(request, await self._body(request), load=True)

    async def clear_kv(self, request: Request) -> Response:
        return await self.admin.clear_kv(request, self._forget_cache)

    def _forget_cache(self, worker_id: str) -> None:
        index = self.router.index
        if index is not None:
            index.drop_instance(worker_id)

    async def unload_lora(self, request: Request) -> Response:
        return await self.admin.lora(request, await self._body(request), load=False)

    async def version(self, request: Request) -> Response:
        from importlib.metadata import version

        return JSONResponse({"version": version("dynvllm")})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "alive", "pid": os.getpid()})

    async def health(self, request: Request) -> Response:
        """200 when some model can serve requests end to end; counts workers per model and role."""
        entries = self.models.models.values()
        workers = sum(len(e.instances) for e in entries)
        ready = sorted(e.name for e in entries if e.servable)
        ok = bool(ready) and not self.draining
        roles: dict[str, dict[str, int]] = {}
        for e in entries:
            for inst in e.instances.values():
                per_model = roles.setdefault(e.name, {})
                per_model[inst.role] = per_model.get(inst.role, 0) + 1
        body = {
            "status": "healthy" if ok else "unhealthy",
            "workers": workers,
            "models": ready,
            "roles": roles,
            "draining": self.draining,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prom(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: a prompt, or chat messages through the chat template."""
        try:
            data = oa.json_object(await self._body(request))
            entry = await self._entry(str(data.get("model", "")))
            tok = entry.tokenizer
            assert tok is not None
            if "messages" in data:
                req = oa.validate(oa.ChatRequest, {**data, "max_tokens": None})
                ids = self.chat_fmt.prompts(entry, req)[0][0]
            elif isinstance(data.get("prompt"), str):
                add_special = data.get("add_special_tokens", True)
                ids = tok.encode(data["prompt"], add_special_tokens=bool(add_special))
            else:
                raise oa.APIError(400, "send a prompt (string) or messages", param="prompt")
        except oa.APIError as exc:
            return _error(exc)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": entry.context_length, "tokens": ids}
        body["token_strs"] = [tok.id_to_token(t) for t in ids] if data.get("return_token_strs") else None
        return JSONResponse(body)

    async def detokenize(self, request: Request) -> Response:
        try:
            data = oa.json_object(await self._body(request))
            entry = await self._entry(str(data.get("model", "")))
            ids = data.get("tokens")
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise oa.APIError(400, "tokens must be a list of token ids", param="tokens")
            self._check_tokens(entry, ids, allow_empty=True)
            assert entry.tokenizer is not None
            return JSONResponse({"prompt": entry.tokenizer.decode(ids)})
        except oa.APIError as exc:
            return _error(exc)

    # ---- inference -----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, self.chat_fmt)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, self.completion_fmt)

    async def _body(self, request: Request) -> bytes:
        body = await request.body()
        if len(body) > self.max_body:
            raise oa.APIError(413, f"request body is {len(body)} bytes; the limit is {self.max_body}")
        return body

    def _unknown_model(self, name: str) -> oa.APIError:
        known = ", ".join(sorted(self.models.models)) or "none"
        return oa.APIError(
            404,
            f"The model {name!r} does not exist. Available models: {known}",
            param="model",
            code="model_not_found",
        )

    async def _entry(self, name: str) -> ModelEntry:
        entry, _ = await self._resolve(name)
        return entry

    async def _resolve(self, name: str) -> tuple[ModelEntry, str | None]:
        """The model's entry, and the adapter when the name is one (404 when nothing serves it)."""
        entry, lora = await self.models.resolve(name)
        if entry is None and self.on_demand is not None and await self.on_demand.ensure(name):
            entry, lora = await self.models.resolve(name)
        if entry is None or not entry.instances:
            raise self._unknown_model(name)
        return entry, lora

    @staticmethod
    def _budget(entry: ModelEntry, prompt_len: int, wanted: int | None) -> int:
        """max_tokens: the request's, else the model's default, else the rest of the context;
        within the cap a generation config may set (as vLLM's server computes it)."""
        ctx = entry.context_length
        if prompt_len >= ctx:
            raise oa.length_error(ctx, prompt_len, None)
        if wanted is None:
            wanted = min(ctx - prompt_len, entry.sampling_defaults.get("max_tokens") or ctx)
        elif prompt_len + wanted > ctx:
            raise oa.length_error(ctx, prompt_len, wanted)
        return min(wanted, entry.max_tokens_cap or wanted)

    @staticmethod
    def _check_tokens(entry: ModelEntry, ids: list[int], allow_empty: bool = False) -> None:
        assert entry.tokenizer is not None
        vocab = entry.tokenizer.vocab_size
        if not ids and not allow_empty:
            raise oa.APIError(400, "the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise oa.APIError(
                400, f"token id {bad[0]} is out of range for a vocabulary of {vocab}", param="prompt"
            )

    async def _admit(self, req: Any, fmt: Formatter) -> _Request:
        """Tokenize, check and budget a parsed request (an APIError says what is wrong)."""
        entry, lora = await self._resolve(req.model)
        tok = entry.tokenizer
        assert tok is not None
        images = await self._images(entry, req)
        dispatches, parts = [], []
        for ids, text in fmt.prompts(entry, req):
            self._check_tokens(entry, ids)
            max_tokens = self._budget(entry, len(ids), req.wanted_max_tokens())
            sampling = req.sampling(max_tokens, tok.vocab_size, entry.sampling_defaults)
            dispatches.append(
                Dispatch(self.pool, self.router, entry, ids, sampling, self.metrics, lora, images)
            )
            post = PostProcessor(
                tok, req.n, len(ids), req.stops(), req.include_stop_str_in_output, req.skip_special_tokens
            )
            parts.append(Part(ids, text, post))
        return _Request(fmt, req, dispatches, parts)

    async def _images(self, entry: ModelEntry, req: Any) -> list[bytes] | None:
        """The request's images, fetched and checked (chat requests only)."""
        if not isinstance(req, oa.ChatRequest):  # a completion's unknown "messages" is not chat
            return None
        urls = [u for m in req.messages for u in m.image_urls()]
        if not urls:
            return None
        if not entry.card.get("multimodal"):
            raise oa.APIError(
                400, f"model {entry.name!r} takes text only; it cannot read images", param="messages"
            )
        return await fetch_all(urls, self.media)

    async def _serve(self, request: Request, fmt: Formatter) -> Response:
        model = "?"
        try:
            req = oa.parse(fmt.request_model, await self._body(request))
            # A label per name a client sends would grow the metrics without bound.
            model = req.model if self.models.knows(req.model) else "unknown"
            r = await self._admit(req, fmt)
        except oa.APIError as exc:
            self.metrics.of(self.metrics.requests, model, str(exc.status)).inc()
            return _error(exc)
        self.metrics.of(self.metrics.prompt_tokens, r.model).inc(sum(len(p.prompt_ids) for p in r.parts))
        if r.req.stream:
            return EventStream(self._stream(r), r.dispatch.headers, _early_error)  # type: ignore[return-value]
        return await self._complete(r)

    async def _complete(self, r: _Request) -> Response:
        self.metrics.of(self.metrics.inflight, r.model).inc()
        try:
            async for index, part, d in r.deltas():
                r.shaper.chunk(index, part, d)
        except RemoteError as exc:
            err = _remote_to_api(exc)
            self.metrics.of(self.metrics.requests, r.model, str(err.status)).inc()
            return _error(err)
        finally:
            self.metrics.of(self.metrics.inflight, r.model).dec()
        self._account(r, "200")
        body = {
            "id": r.id,
            "object": r.fmt.object_name,
            "created": r.created,
            "model": r.model,
            "choices": r.shaper.choices(),
            "usage": r.usage(),
        }
        return JSONResponse(body, headers=r.dispatch.headers())

    def _account(self, r: _Request, status: str) -> None:
        name = r.model
        self.metrics.of(self.metrics.requests, name, status).inc()
        for part, dispatch in zip(r.parts, r.dispatches, strict=True):
            self.metrics.of(self.metrics.output_tokens, name).inc(part.post.usage.completion_tokens)
            self.metrics.of(self.metrics.cached_tokens, name).inc(part.post.usage.cached_tokens)
            if dispatch.worker_id:
                self.metrics.of(self.metrics.routed, name, dispatch.worker_id).inc()
                if dispatch.lora and self.on_demand is not None:
                    self.on_demand.used(dispatch.worker_id, dispatch.lora)

    async def _stream(self, r: _Request) -> AsyncIterator[bytes]:
        """SSE bytes. Events that are ready together leave in one write: output already queued
        from the worker is gathered instead of sent (`flush_due`), so a busy frontend makes fewer,
        larger writes and an idle one sends each token as it comes. The opening (role) chunk goes
        with the first token's."""
        base = {"id": r.id, "object": r.fmt.chunk_object, "created": r.created, "model": r.model}
        self.metrics.of(self.metrics.inflight, r.model).inc()
        status = "200"
        out: list[bytes] = []
        sent = False
        try:
            out.extend(_sse({**base, "choices": [choice]}) for choice in r.shaper.opening())
            async for index, part, d in r.deltas():
                for choice in r.shaper.chunk(index, part, d):
                    out.append(_sse({**base, "choices": [choice]}))
                # A choice's last chunk waits for the next delta or the end: the stream's last
                # one leaves with [DONE] and the end of the body, in one write.
                if out and not d.finish_reason and r.flush_due():
                    sent = True
                    yield b"".join(out)
                    out.clear()
            if r.req.include_usage():
                out.append(_sse({**base, "choices": [], "usage": r.usage()}))
        except RemoteError as exc:
            err = _remote_to_api(exc)
            status = str(err.status)
            if not sent:
                raise err from None  # nothing streamed yet: answered with its status (EventStream)
            out.append(_sse(err.body()))
        except BaseException:
            status = "499"  # the client went away; the worker stream was cancelled
            raise
        finally:
            self.metrics.of(self.metrics.inflight, r.model).dec()
            self._account(r, status)
        out.append(b"data: [DONE]\n\n")
        yield Last(b"".join(out))


def _load_parser(group: str, name: str | None) -> Any:
    if not name:
        return None
    return registry.load(group, name)()


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in OpenAI's shape, not as plain text."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    body = oa.APIError(
        exc.status_code, message, "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    )
    return JSONResponse(body.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug of ours still answers in OpenAI's shape (the traceback goes to the log)."""
    err = oa.APIError(500, f"internal error: {type(exc).__name__}", "internal_server_error")
    return JSONResponse(err.body(), status_code=500)
