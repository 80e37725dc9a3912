"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) over the shared request
path, for clients and agents written against the `anthropic` SDK.

A Messages request is translated into the chat request it means (system prompt, text, images,
tool definitions, tool calls and results), so prompts are built by the same chat template and
output goes through the same tool and reasoning parsers as OpenAI's chat; what comes back is
shaped as Anthropic's message, content blocks and named SSE events. Fields the API defines that
this surface does not implement are refused with a 400 that names them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError, from_remote
from dynvllm.frontend.event_stream import EventStream, Last, Reply
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.formatters import ChatFormatter
from dynvllm.frontend.openai.surface import chat_formatter
from dynvllm.frontend.surface import Surface
from dynvllm.runtime.errors import RemoteError

_json = msgspec.json.Encoder().encode

#: Anthropic's error type for each status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class _Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None
    cache_control: dict | None = None


class _Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    """The fields of Anthropic's request; anything else is refused by name (`extra="forbid"`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[_Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[_Tool] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    #: Extended thinking needs a reasoning parser's split: refused unless disabled.
    thinking: dict[str, Any] | None = None
    service_tier: str | None = None
    #: Prompt caching: every prefix is cached here already (KV-aware routing included).
    cache_control: dict[str, Any] | None = None


def _text_of(blocks: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    out = []
    for b in blocks:
        if b.get("type") != "text":
            raise RequestError(400, f"{where}: only text blocks are allowed here", param=where)
        out.append(str(b.get("text", "")))
    return "".join(out)


def _image_url(block: dict[str, Any]) -> str:
    src = block.get("source") or {}
    if src.get("type") == "base64":
        return f"data:{src.get('media_type', 'image/png')};base64,{src.get('data', '')}"
    if src.get("type") == "url" and isinstance(src.get("url"), str):
        return src["url"]
    raise RequestError(400, "an image block needs a base64 or url source", param="messages.content")


def _chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The OpenAI chat messages an Anthropic conversation means."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
    for m in req.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for b in m.content:
            kind = b.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(b.get("text", ""))})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(b)}})
            elif kind == "tool_use" and m.role == "assistant":
                args = json.dumps(b.get("input") or {})
                calls.append(
                    {
                        "id": b.get("id"),
                        "type": "function",
                        "function": {"name": b.get("name"), "arguments": args},
                    }
                )
            elif kind == "tool_result" and m.role == "user":
                result = b.get("content")
                text = _text_of(result, "messages.content.tool_result") if result is not None else ""
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": text})
            else:
                raise RequestError(
                    400,
                    f"content block type {kind!r} is not supported in a {m.role} message",
                    param="messages.content",
                )
        if parts or calls:
            msg: dict[str, Any] = {"role": m.role, "content": parts or None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def _tool_choice(choice: dict[str, Any] | None) -> Any:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise RequestError(
        400, f"tool_choice type {kind!r} is not one of auto, any, tool, none", param="tool_choice"
    )


def to_chat(req: MessagesRequest) -> oa.ChatRequest:
    """The chat request an Anthropic Messages request means (pure)."""
    if req.thinking and req.thinking.get("type") != "disabled":
        raise RequestError(400, "thinking is not supported by this server", param="thinking")
    if req.tool_choice and req.tool_choice.get("disable_parallel_tool_use"):
        raise RequestError(400, "tool_choice.disable_parallel_tool_use is not supported", param="tool_choice")
    data: dict[str, Any] = {
        "model": req.model,
        "messages": _chat_messages(req),
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop_sequences,
        "stream": req.stream,
    }
    if req.tools:
        data["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in req.tools
        ]
        data["tool_choice"] = _tool_choice(req.tool_choice) or "auto"
    elif req.tool_choice is not None:
        raise RequestError(400, "tool_choice needs tools", param="tool_choice")
    return oa.validate(oa.ChatRequest, {k: v for k, v in data.items() if v is not None})


def _parse(raw: bytes) -> MessagesRequest:
    return bodies.parse_strict(MessagesRequest, raw)


def stop_reason(finish: str | None, stop: str | int | None, called: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a finished choice (pure)."""
    if called:
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


def _tool_block(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        args = {"_raw": fn.get("arguments")}
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": args}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _json({"type": name, **data}) + b"\n\n"


def _text_delta(block: int, text: str) -> bytes:
    """`_event("content_block_delta", ...)` of a text delta, the same bytes, built the cheap way
    (one per token)."""
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
        b'"delta":{"type":"text_delta","text":%s}}\n\n' % (block, _json(text))
    )


def _answer(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(_json(body), media_type="application/json", headers=headers)


class AnthropicSurface(Surface):
    description = "Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens)"

    def __init__(self, path: Any, settings: Any) -> None:
        super().__init__(path, settings)
        # The same chat template, tool and reasoning parsers as the OpenAI surface's chat.
        self.chat_fmt: ChatFormatter = chat_formatter(settings.frontend)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
        ]

    # ---- shape of errors and auth --------------------------------------------------------
    @staticmethod
    def _error_body(err: RequestError) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(err.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": err.message}}

    def error_response(self, err: RequestError, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse(
            self._error_body(err), status_code=err.status, headers={**err.headers, **(headers or {})}
        )

    def presented_key(self, headers: dict[bytes, bytes]) -> bytes | None:
        # The SDK sends x-api-key; with an auth token it sends Authorization: Bearer instead.
        key = headers.get(b"x-api-key")
        return key.strip() if key else super().presented_key(headers)

    def unauthorized(self) -> Response:
        return self.error_response(RequestError(401, "invalid x-api-key"))

    # ---- routes ------------------------------------------------------------------------------
    async def count_tokens(self, request: Request) -> Response:
        try:
            data = bodies.json_object(await bodies.read(request, self.max_body))
            data.setdefault("max_tokens", 1)
            req = bodies.validate_strict(MessagesRequest, data)
            chat = to_chat(req)
            entry = await self.path.entry(req.model)
            ids = self.chat_fmt.prompts(entry, chat)[0][0]
        except RequestError as exc:
            return self.error_response(exc)
        return _answer({"input_tokens": len(ids)})

    async def messages(self, request: Request) -> Reply:
        model = "?"
        try:
            req = _parse(await bodies.read(request, self.max_body))
            model = req.model
            chat = to_chat(req)
            messages = chat.messages
            r = await self.path.admit(
                "anthropic",
                chat,
                lambda entry: self.chat_fmt.prompts(entry, chat),
                lambda: [u for m in messages for u in m.image_urls()],
                request.headers,
            )
        except RequestError as exc:
            self.path.refused(model, exc)
            return self.error_response(exc)
        shaper = self.chat_fmt.shaper(chat, r.parts, 1)
        msg_id = "msg_" + r.request_id
        if req.stream:
            early = lambda exc: (  # noqa: E731
                (exc.status, _json(self._error_body(exc))) if isinstance(exc, RequestError) else None
            )
            return EventStream(self._stream(r, shaper, msg_id), r.headers, early)

        async def consume() -> str | int | None:
            stop: str | int | None = None
            async for index, part, d in r.deltas():
                if d.finish_reason:
                    stop = d.stop_reason
                shaper.advance(index, part, d)
            return stop

        stop = await self.path.complete(r, consume)
        if isinstance(stop, RequestError):
            return self.error_response(stop)
        choice = shaper.choices()[0]
        message = choice["message"]
        content: list[dict[str, Any]] = []
        if message.get("content") or not message.get("tool_calls"):
            content.append({"type": "text", "text": message.get("content") or ""})
        content += [_tool_block(c) for c in message.get("tool_calls") or ()]
        post = r.parts[0].post
        assert post is not None  # a generation's part always has its post-processor
        reason, sequence = stop_reason(shaper.finish[0], stop, bool(message.get("tool_calls")))
        usage = post.usage
        body = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": r.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "output_tokens": usage.completion_tokens,
                "cache_read_input_tokens": usage.cached_tokens,
            },
        }
        return _answer(body, r.headers())

    async def _stream(self, r: Any, shaper: Any, msg_id: str) -> AsyncIterator[bytes]:
        """Anthropic's events: message_start, a content block per text run or tool call (start,
        deltas, stop), message_delta with the stop reason and usage, message_stop."""
        self.path.begin(r)
        status = "200"
        usage = r.parts[0].post.usage
        start = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": r.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": 0},
        }
        out: list[bytes] = [_event("message_start", {"message": start})]
        block = -1  # index of the open content block
        kind: str | None = None  # its type
        finish: str | None = None
        stop: str | int | None = None
        called = False
        sent = False
        try:
            async for index, part, d in r.deltas():
                if d.finish_reason:
                    finish, stop = d.finish_reason, d.stop_reason
                got = shaper.advance(index, part, d)
                if got.content:
                    if kind != "text":
                        if kind is not None:
                            out.append(_event("content_block_stop", {"index": block}))
                        block, kind = block + 1, "text"
                        out.append(
                            _event(
                                "content_block_start",
                                {"index": block, "content_block": {"type": "text", "text": ""}},
                            )
                        )
                    out.append(_text_delta(block, got.content))
                for call in got.tool_calls:
                    called = True
                    if kind is not None:
                        out.append(_event("content_block_stop", {"index": block}))
                    block, kind = block + 1, "tool_use"
                    head = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
                    out.append(_event("content_block_start", {"index": block, "content_block": head}))
                    partial = {"type": "input_json_delta", "partial_json": call.arguments or "{}"}
                    out.append(_event("content_block_delta", {"index": block, "delta": partial}))
                if out and not d.finish_reason and r.flush_due():
                    sent = True
                    yield b"".join(out)
                    out.clear()
            if kind is not None:
                out.append(_event("content_block_stop", {"index": block}))
            reason, sequence = stop_reason(finish, stop, called)
            out.append(
                _event(
                    "message_delta",
                    {
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        # The prompt's count too, as Anthropic's API and vLLM's server send it.
                        "usage": {
                            "input_tokens": usage.prompt_tokens,
                            "output_tokens": usage.completion_tokens,
                        },
                    },
                )
            )
            out.append(_event("message_stop", {}))
        except RemoteError as exc:
            err = from_remote(exc)
            status = str(err.status)
            if not sent:
                raise err from None
            out.append(b"event: error\ndata: " + _json(self._error_body(err)) + b"\n\n")
        except BaseException:
            status = "499"
            raise
        finally:
            self.path.end(r, status)
        yield Last(b"".join(out))
