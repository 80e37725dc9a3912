"""OpenAI's API (and vLLM's additions to it): chat and text completions, models, tokenize.

Request bodies become prompts through the endpoint's formatter; the shared `RequestPath` admits
and runs them; what comes back is shaped into OpenAI's bodies and SSE chunks here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dynvllm import registry
from dynvllm.frontend import bodies, vllm_parsers
from dynvllm.frontend.errors import RequestError, from_remote
from dynvllm.frontend.event_stream import EventStream, Last, Reply
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.completion_format import CompletionFormatter
from dynvllm.frontend.openai.formatters import ChatFormatter, Formatter, Shaper
from dynvllm.frontend.request_path import Admitted, RequestPath
from dynvllm.frontend.surface import Surface
from dynvllm.frontend.tokenizer import read_chat_template
from dynvllm.runtime.errors import RemoteError
from dynvllm.settings import FrontendSettings, Settings

_json = msgspec.json.Encoder().encode


def _sse(obj: Any) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def _early_error(exc: Exception) -> tuple[int, bytes] | None:
    """A streaming request that failed before its first event: its status and JSON error."""
    if isinstance(exc, RequestError):
        return exc.status, _json(exc.body())
    return None


def _load_parser(group: str, name: str | None) -> Any:
    if not name:
        return None
    return registry.load(group, name)()


def chat_formatter(settings: FrontendSettings) -> ChatFormatter:
    """Chat templating with the configured tool and reasoning parsers (other chat-like APIs use
    it). dynvllm's own parsers serve the names it has; any other name (or one written `vllm:NAME`,
    or any with --tool-parser-plugin) makes vLLM's parsers serve both, as its server runs them."""
    tool, reasoning = settings.tool_call_parser, settings.reasoning_parser
    plugin = getattr(settings, "tool_parser_plugin", None)
    own_tools = registry.names(registry.TOOL_PARSERS)
    own_reasoning = registry.names(registry.REASONING_PARSERS)
    template = read_chat_template(settings.chat_template) if settings.chat_template else None
    if plugin or vllm_parsers.uses_vllm(tool, own_tools) or vllm_parsers.uses_vllm(reasoning, own_reasoning):
        bare = [n.removeprefix(vllm_parsers.PREFIX) if n else None for n in (tool, reasoning)]
        parsers = vllm_parsers.VllmParsers(bare[0], bare[1], plugin)
        return ChatFormatter(
            None, None, settings.mm_prompt_template, template, settings.trust_request_chat_template, parsers
        )
    return ChatFormatter(
        _load_parser(registry.TOOL_PARSERS, tool),
        _load_parser(registry.REASONING_PARSERS, reasoning),
        settings.mm_prompt_template,
        template,
        settings.trust_request_chat_template,
    )


class _Job:
    """An admitted request with what OpenAI's answer needs: its formatter, body and shaper."""

    def __init__(self, fmt: Formatter, req: Any, r: Admitted) -> None:
        self.fmt, self.req, self.r = fmt, req, r
        self.id = fmt.id_prefix + r.request_id
        self.shaper: Shaper = fmt.shaper(req, r.parts, req.n)

    def usage(self) -> dict:
        return self.r.usage().as_dict()


class OpenAISurface(Surface):
    description = "OpenAI's chat/completions API with vLLM's extensions (tokenize, models)"

    def __init__(self, path: RequestPath, settings: Settings) -> None:
        super().__init__(path, settings)
        self.chat_fmt = chat_formatter(settings.frontend)
        self.completion_fmt = CompletionFormatter()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
        ]

    # ---- models ----------------------------------------------------------------------
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
        # A model is listed once a worker that serves requests end to end is registered:
        # clients that poll /v1/models for readiness never see a model they cannot use yet.
        models = self.path.models
        cards = {name: self._model_card(name, e) for name, e in models.models.items() if e.servable}
        for name, (base, _) in models.adapters().items():
            cards.setdefault(name, {**self._model_card(name, base), "root": name, "parent": base.name})
        for alias, model in models.aliases.items():
            if model in cards:
                cards.setdefault(alias, {**cards[model], "id": alias})
        return cards

    async def list_models(self, request: Request) -> Response:
        cards = sorted(self._cards().items())
        data = [c for name, c in cards if self.path.visible(request.headers, name)]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        card = self._cards().get(name)
        if card is None or not self.path.visible(request.headers, name):
            return self.error_response(self.path.unknown_model(name))
        return JSONResponse(card)

    # ---- tokens ------------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: a prompt, or chat messages through the chat template."""
        try:
            data = bodies.json_object(await bodies.read(request, self.max_body))
            entry = await self.path.entry(str(data.get("model", "")))
            tok = entry.tokenizer
            assert tok is not None
            if "messages" in data:
                req = oa.validate(oa.ChatRequest, {**data, "max_tokens": None})
                ids = self.chat_fmt.prompts(entry, req)[0][0]
            elif isinstance(data.get("prompt"), str):
                add_special = data.get("add_special_tokens", True)
                ids = tok.encode(data["prompt"], add_special_tokens=bool(add_special))
            else:
                raise RequestError(400, "send a prompt (string) or messages", param="prompt")
        except RequestError as exc:
            return self.error_response(exc)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": entry.context_length, "tokens": ids}
        body["token_strs"] = [tok.id_to_token(t) for t in ids] if data.get("return_token_strs") else None
        return JSONResponse(body)

    async def detokenize(self, request: Request) -> Response:
        try:
            data = bodies.json_object(await bodies.read(request, self.max_body))
            entry = await self.path.entry(str(data.get("model", "")))
            ids = data.get("tokens")
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise RequestError(400, "tokens must be a list of token ids", param="tokens")
            self.path.check_tokens(entry, ids, allow_empty=True)
            assert entry.tokenizer is not None
            return JSONResponse({"prompt": entry.tokenizer.decode(ids)})
        except RequestError as exc:
            return self.error_response(exc)

    # ---- inference -----------------------------------------------------------------------
    async def chat(self, request: Request) -> Reply:
        return await self._serve(request, self.chat_fmt)

    async def completions(self, request: Request) -> Reply:
        return await self._serve(request, self.completion_fmt)

    async def _serve(self, request: Request, fmt: Formatter) -> Reply:
        model = "?"
        try:
            req = oa.parse(fmt.request_model, await bodies.read(request, self.max_body))
            model = req.model
            images = None
            if isinstance(req, oa.ChatRequest):  # a completion's unknown "messages" is not chat
                messages = req.messages
                images = lambda: [u for m in messages for u in m.image_urls()]  # noqa: E731
            r = await self.path.admit(
                "openai", req, lambda entry: fmt.prompts(entry, req), images, request.headers
            )
        except RequestError as exc:
            self.path.refused(model, exc)
            return self.error_response(exc)
        job = _Job(fmt, req, r)
        if req.stream:
            return EventStream(self._stream(job), r.headers, _early_error)
        return await self._complete(job)

    async def _complete(self, job: _Job) -> Response:
        r = job.r

        async def consume() -> None:
            async for index, part, d in r.deltas():
                job.shaper.chunk(index, part, d)

        failed = await self.path.complete(r, consume)
        if failed is not None:
            return self.error_response(failed)
        body = {
            "id": job.id,
            "object": job.fmt.object_name,
            "created": r.created,
            "model": r.model,
            "choices": job.shaper.choices(),
            "usage": job.usage(),
            **job.shaper.top(),
        }
        return JSONResponse(body, headers=r.headers())

    async def _stream(self, job: _Job) -> AsyncIterator[bytes]:
        """SSE bytes. Events that are ready together leave in one write: output already queued
        from the worker is gathered instead of sent (`flush_due`), so a busy frontend makes fewer,
        larger writes and an idle one sends each token as it comes. The opening (role) chunk goes
        with the first token's."""
        r = job.r
        base = {"id": job.id, "object": job.fmt.chunk_object, "created": r.created, "model": r.model}
        self.path.begin(r)
        status = "200"
        out: list[bytes] = []
        sent = False
        try:
            top = job.shaper.top()  # vLLM's extras (prompt_token_ids) go with the first chunk
            for choice in job.shaper.opening():
                out.append(_sse({**base, "choices": [choice], **top}))
                top = {}
            async for index, part, d in r.deltas():
                for choice in job.shaper.chunk(index, part, d):
                    out.append(_sse({**base, "choices": [choice]}))
                # A choice's last chunk waits for the next delta or the end: the stream's last
                # one leaves with [DONE] and the end of the body, in one write.
                if out and not d.finish_reason and r.flush_due():
                    sent = True
                    yield b"".join(out)
                    out.clear()
            if job.req.include_usage():
                out.append(_sse({**base, "choices": [], "usage": job.usage()}))
        except RemoteError as exc:
            err = from_remote(exc)
            status = str(err.status)
            if not sent:
                raise err from None  # nothing streamed yet: answered with its status (EventStream)
            out.append(_sse(err.body()))
        except BaseException:
            status = "499"  # the client went away; the worker stream was cancelled
            raise
        finally:
            self.path.end(r, status)
        out.append(b"data: [DONE]\n\n")
        yield Last(b"".join(out))
