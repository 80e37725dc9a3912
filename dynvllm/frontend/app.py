"""HTTP routes of the OpenAI-compatible API (Starlette), formatting what the pipeline yields."""

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
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelEntry, ModelRegistry
from dynvllm.frontend.pipeline import Generation
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

    def _budget(self, entry: ModelEntry, prompt_len: int, wanted: int | None) -> int:
        ctx = entry.context_length
        if prompt_len >= ctx:
            raise oa.length_error(ctx, prompt_len, None)
        if wanted is None:
            return ctx - prompt_len
        if prompt_len + wanted > ctx:
            raise oa.length_error(ctx, prompt_len, wanted)
        return wanted

    def _check_tokens(self, entry: ModelEntry, ids: list[int]) -> None:
        assert entry.tokenizer is not None
        vocab = entry.tokenizer.vocab_size
        if not ids:
            raise oa.APIError(400, "the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise oa.APIError(
                400, f"token id {bad[0]} is out of range for a vocabulary of {vocab}", param="prompt"
            )

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, oa.ChatRequest, "chat", self._chat_ids)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, oa.CompletionRequest, "completion", self._completion_ids)

    @staticmethod
    def _chat_ids(entry: ModelEntry, req: oa.ChatRequest) -> list[int]:
        tok = entry.tokenizer
        assert tok is not None
        try:
            text = tok.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
            )
        except oa.APIError:
            raise
        except Exception as exc:
            raise oa.APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    @staticmethod
    def _completion_ids(entry: ModelEntry, req: oa.CompletionRequest) -> list[int]:
        prompts = req.prompts()
        if len(prompts) != 1:
            raise oa.APIError(
                400, "send one prompt per request (batched prompts are not supported)", param="prompt"
            )
        p = prompts[0]
        assert entry.tokenizer is not None
        return entry.tokenizer.encode(p) if isinstance(p, str) else list(p)

    async def _serve(self, request: Request, model_cls: type, kind: str, to_ids: Any) -> Response:
        """Parse, tokenize, check and budget a request, then stream or answer it."""
        model = "?"
        try:
            req = oa.parse(model_cls, await self._body(request))
            model = req.model
            entry = await self._entry(req.model)
            ids = to_ids(entry, req)
            self._check_tokens(entry, ids)
            max_tokens = self._budget(entry, len(ids), req.wanted_max_tokens())
            gen = self._generation(entry, ids, req, max_tokens)
        except oa.APIError as exc:
            self.metrics.requests.labels(model, str(exc.status)).inc()
            return _error(exc)
        return await self._respond(gen, req, kind)

    def _generation(self, entry: ModelEntry, ids: list[int], req: Any, max_tokens: int) -> Generation:
        return Generation(
            self.pool,
            self.router,
            entry,
            ids,
            req.sampling(max_tokens),
            req.stops(),
            req.include_stop_str_in_output,
            req.skip_special_tokens,
            self.metrics,
        )

    async def _respond(self, gen: Generation, req: Any, kind: str) -> Response:
        name = gen.entry.name
        self.metrics.prompt_tokens.labels(name).inc(len(gen.prompt_ids))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + gen.request_id
        created = int(time.time())
        if req.stream:
            return StreamingResponse(
                self._stream(gen, req, kind, rid, created),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        self.metrics.inflight.labels(name).inc()
        try:
            texts = [""] * gen.n
            finish: list[str | None] = [None] * gen.n
            lps: list[list] = [[] for _ in range(gen.n)]
            async for d in gen.run():
                texts[d.index] += d.text
                if d.logprobs:
                    lps[d.index] += d.logprobs
                if d.finish_reason:
                    finish[d.index] = d.finish_reason
        except RemoteError as exc:
            err = _remote_to_api(exc)
            self.metrics.requests.labels(name, str(err.status)).inc()
            return _error(err)
        finally:
            self.metrics.inflight.labels(name).dec()
        self._account(gen, "200")
        choices = [
            self._choice(
                kind,
                i,
                texts[i],
                finish[i] or "stop",
                lps[i] if gen.sampling.get("logprobs") is not None else None,
                stream=False,
            )
            for i in range(gen.n)
        ]
        body = {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": name,
            "choices": choices,
            "usage": gen.usage.as_dict(),
        }
        return JSONResponse(body, headers=self._route_headers(gen))

    @staticmethod
    def _route_headers(gen: Generation) -> dict[str, str]:
        return {
            "x-dynvllm-worker": gen.worker_id or "",
            "x-dynvllm-predicted-cached-tokens": str(gen.overlap_blocks * gen.block_size),
            "x-dynvllm-prefill": gen.prefill_outcome
            + (f":{gen.prefill_worker}" if gen.prefill_worker else ""),
        }

    def _account(self, gen: Generation, status: str) -> None:
        name = gen.entry.name
        self.metrics.requests.labels(name, status).inc()
        self.metrics.output_tokens.labels(name).inc(gen.usage.completion_tokens)
        self.metrics.cached_tokens.labels(name).inc(gen.usage.cached_tokens)
        if gen.worker_id:
            self.metrics.routed.labels(name, gen.worker_id).inc()

    @staticmethod
    def _logprobs(kind: str, entries: list) -> Any:
        if kind == "chat":
            return {
                "content": [
                    {
                        "token": t,
                        "logprob": lp,
                        "bytes": list(t.encode()),
                        "top_logprobs": [
                            {"token": tt, "logprob": tlp, "bytes": list(tt.encode())} for tt, tlp in top
                        ],
                    }
                    for t, lp, top in entries
                ]
            }
        return {
            "tokens": [t for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tt: tlp for tt, tlp in top} for _, _, top in entries],
            "text_offset": [],
        }

    def _choice(
        self, kind: str, index: int, text: str, finish: str | None, lps: list | None, stream: bool
    ) -> dict:
        logprobs = self._logprobs(kind, lps) if lps is not None else None
        if kind == "chat":
            key = "delta" if stream else "message"
            msg: dict = {"content": text} if stream else {"role": "assistant", "content": text}
            return {"index": index, key: msg, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    async def _stream(
        self, gen: Generation, req: Any, kind: str, rid: str, created: int
    ) -> AsyncIterator[bytes]:
        name = gen.entry.name
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": name}
        want_lp = gen.sampling.get("logprobs") is not None
        self.metrics.inflight.labels(name).inc()
        status = "200"
        try:
            if kind == "chat":
                for i in range(gen.n):
                    yield _sse(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
            async for d in gen.run():
                if not d.text and d.finish_reason is None and not d.logprobs:
                    continue
                choice = self._choice(
                    kind, d.index, d.text, d.finish_reason, d.logprobs if want_lp else None, stream=True
                )
                yield _sse({**base, "choices": [choice]})
            if req.include_usage():
                yield _sse({**base, "choices": [], "usage": gen.usage.as_dict()})
        except RemoteError as exc:
            err = _remote_to_api(exc)
            status = str(err.status)
            yield _sse(err.body())
        except BaseException:
            status = "499"  # the client went away; the worker stream was cancelled
            raise
        finally:
            self.metrics.inflight.labels(name).dec()
            self._account(gen, status)
        yield b"data: [DONE]\n\n"
