"""HTTP routes of the OpenAI-compatible API (Starlette): one request path for every endpoint.

A request is parsed and tokenized by its endpoint's formatter, dispatched (`Dispatch`: workers,
stages, streams), post-processed (`PostProcessor`: text, stops, logprobs, usage) and formatted.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dynvllm.frontend import openai_api as oa
from dynvllm.frontend.dispatch import Dispatch
from dynvllm.frontend.formatters import CHAT, COMPLETION, Formatter
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry, ModelRegistry
from dynvllm.frontend.postprocess import ChoiceDelta, PostProcessor
from dynvllm.frontend.routing import Router
from dynvllm.runtime.errors import BadRequest, InstanceLost, RemoteError
from dynvllm.runtime.streams import StreamClientPool


def _error(exc: oa.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


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
    """One admitted request: its formatter, parsed body, dispatch and post-processor."""

    def __init__(self, fmt: Formatter, req: Any, dispatch: Dispatch, post: PostProcessor) -> None:
        self.fmt, self.req, self.dispatch, self.post = fmt, req, dispatch, post
        self.model = dispatch.entry.name
        self.id = fmt.id_prefix + dispatch.request_id
        self.created = int(time.time())
        self.want_logprobs = dispatch.sampling.get("logprobs") is not None


class FrontendApp:
    def __init__(self, models: ModelRegistry, pool: StreamClientPool, router: Router, max_body: int) -> None:
        self.models, self.pool, self.router, self.max_body = models, pool, router, max_body
        self.metrics = FrontendMetrics()
        self.draining = False
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/live", self.live, methods=["GET"]),
                Route("/metrics", self.prom, methods=["GET"]),
            ]
        )

    # ---- simple endpoints ----------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "dynvllm",
                "max_model_len": e.context_length,
            }
            for name, e in sorted(self.models.models.items())
        ]
        return JSONResponse({"object": "list", "data": data})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def health(self, request: Request) -> Response:
        workers = sum(len(e.instances) for e in self.models.models.values())
        ok = workers > 0 and not self.draining
        body = {
            "status": "healthy" if ok else "unhealthy",
            "workers": workers,
            "models": sorted(self.models.models),
            "draining": self.draining,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prom(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- inference -----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, COMPLETION)

    async def _body(self, request: Request) -> bytes:
        body = await request.body()
        if len(body) > self.max_body:
            raise oa.APIError(413, f"request body is {len(body)} bytes; the limit is {self.max_body}")
        return body

    async def _entry(self, name: str) -> ModelEntry:
        entry = await self.models.ready(name)
        if entry is None or not entry.instances:
            known = ", ".join(sorted(self.models.models)) or "none"
            raise oa.APIError(
                404,
                f"The model {name!r} does not exist. Available models: {known}",
                param="model",
                code="model_not_found",
            )
        return entry

    @staticmethod
    def _budget(entry: ModelEntry, prompt_len: int, wanted: int | None) -> int:
        ctx = entry.context_length
        if prompt_len >= ctx:
            raise oa.length_error(ctx, prompt_len, None)
        if wanted is None:
            return ctx - prompt_len
        if prompt_len + wanted > ctx:
            raise oa.length_error(ctx, prompt_len, wanted)
        return wanted

    @staticmethod
    def _check_tokens(entry: ModelEntry, ids: list[int]) -> None:
        assert entry.tokenizer is not None
        vocab = entry.tokenizer.vocab_size
        if not ids:
            raise oa.APIError(400, "the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise oa.APIError(
                400, f"token id {bad[0]} is out of range for a vocabulary of {vocab}", param="prompt"
            )

    async def _admit(self, req: Any, fmt: Formatter) -> _Request:
        """Tokenize, check and budget a parsed request (an APIError says what is wrong)."""
        entry = await self._entry(req.model)
        ids = fmt.prompt_ids(entry, req)
        self._check_tokens(entry, ids)
        max_tokens = self._budget(entry, len(ids), req.wanted_max_tokens())
        sampling = req.sampling(max_tokens)
        dispatch = Dispatch(self.pool, self.router, entry, ids, sampling, self.metrics)
        assert entry.tokenizer is not None
        post = PostProcessor(
            entry.tokenizer,
            req.n,
            len(ids),
            req.stops(),
            req.include_stop_str_in_output,
            req.skip_special_tokens,
        )
        return _Request(fmt, req, dispatch, post)

    async def _serve(self, request: Request, fmt: Formatter) -> Response:
        model = "?"
        try:
            req = oa.parse(fmt.request_model, await self._body(request))
            model = req.model
            r = await self._admit(req, fmt)
        except oa.APIError as exc:
            self.metrics.requests.labels(model, str(exc.status)).inc()
            return _error(exc)
        self.metrics.prompt_tokens.labels(r.model).inc(len(r.dispatch.prompt_ids))
        if r.req.stream:
            return StreamingResponse(
                self._stream(r), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self._complete(r)

    async def _complete(self, r: _Request) -> Response:
        n = r.post.n
        texts = [""] * n
        finish: list[str | None] = [None] * n
        lps: list[list] = [[] for _ in range(n)]
        self.metrics.inflight.labels(r.model).inc()
        try:
            async for d in _deltas(r.dispatch, r.post):
                texts[d.index] += d.text
                if d.logprobs:
                    lps[d.index] += d.logprobs
                if d.finish_reason:
                    finish[d.index] = d.finish_reason
        except RemoteError as exc:
            err = _remote_to_api(exc)
            self.metrics.requests.labels(r.model, str(err.status)).inc()
            return _error(err)
        finally:
            self.metrics.inflight.labels(r.model).dec()
        self._account(r, "200")
        choices = [
            r.fmt.choice(i, texts[i], finish[i] or "stop", lps[i] if r.want_logprobs else None)
            for i in range(n)
        ]
        body = {
            "id": r.id,
            "object": r.fmt.object_name,
            "created": r.created,
            "model": r.model,
            "choices": choices,
            "usage": r.post.usage.as_dict(),
        }
        return JSONResponse(body, headers=r.dispatch.headers())

    def _account(self, r: _Request, status: str) -> None:
        name, usage = r.model, r.post.usage
        self.metrics.requests.labels(name, status).inc()
        self.metrics.output_tokens.labels(name).inc(usage.completion_tokens)
        self.metrics.cached_tokens.labels(name).inc(usage.cached_tokens)
        if r.dispatch.worker_id:
            self.metrics.routed.labels(name, r.dispatch.worker_id).inc()

    async def _stream(self, r: _Request) -> AsyncIterator[bytes]:
        base = {"id": r.id, "object": r.fmt.chunk_object, "created": r.created, "model": r.model}
        self.metrics.inflight.labels(r.model).inc()
        status = "200"
        try:
            for choice in r.fmt.opening(r.post.n):
                yield _sse({**base, "choices": [choice]})
            async for d in _deltas(r.dispatch, r.post):
                if not d.text and d.finish_reason is None and not d.logprobs:
                    continue
                choice = r.fmt.chunk_choice(d, d.logprobs if r.want_logprobs else None)
                yield _sse({**base, "choices": [choice]})
            if r.req.include_usage():
                yield _sse({**base, "choices": [], "usage": r.post.usage.as_dict()})
        except RemoteError as exc:
            err = _remote_to_api(exc)
            status = str(err.status)
            yield _sse(err.body())
        except BaseException:
            status = "499"  # the client went away; the worker stream was cancelled
            raise
        finally:
            self.metrics.inflight.labels(r.model).dec()
            self._account(r, status)
        yield b"data: [DONE]\n\n"
