"""OpenAI's Responses API (`/v1/responses`) over the shared request path.

A Responses request is translated into the chat request it means (`responses_schema`), so prompts
come from the same chat template and output goes through the same tool and reasoning parsers as
chat completions; what comes back is shaped as output items and Responses events
(`responses_output`). Responses created with `store: true` (the default, as at OpenAI) are kept
in this frontend process's memory, bounded by --responses-store-size: GET and DELETE
/v1/responses/{id} read and drop them, and `previous_response_id` continues their conversation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError, from_remote
from dynvllm.frontend.event_stream import EventStream, Last, Reply
from dynvllm.frontend.openai.formatters import ChatFormatter
from dynvllm.frontend.openai.surface import chat_formatter
from dynvllm.frontend.request_path import Admitted
from dynvllm.frontend.surface import Surface
from dynvllm.runtime.errors import RemoteError
from dynvllm_plugins.surfaces import responses_output as ro
from dynvllm_plugins.surfaces.responses_schema import ResponsesRequest, output_messages, parse, to_chat
from dynvllm_plugins.surfaces.responses_settings import ResponsesSettings

_json = msgspec.json.Encoder().encode


class Stored:
    """A stored response: its body, and the conversation a next turn continues."""

    __slots__ = ("body", "conversation")

    def __init__(self, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        self.body, self.conversation = body, conversation


class ResponseStore:
    """Responses by id, least recently used dropped first beyond `size` (one process's memory)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rid: str, stored: Stored) -> None:
        self._items[rid] = stored
        self._items.move_to_end(rid)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        found = self._items.get(rid)
        if found is not None:
            self._items.move_to_end(rid)
        return found

    def pop(self, rid: str) -> Stored | None:
        return self._items.pop(rid, None)


def not_found(rid: str, param: str) -> RequestError:
    return RequestError(
        404,
        f"Response with id {rid!r} not found (responses are kept with store: true, in the memory of "
        "the frontend process that created them)",
        param=param,
    )


def _early_error(exc: Exception) -> tuple[int, bytes] | None:
    """A streamed request that failed before its first event: its status and JSON error."""
    return (exc.status, _json(exc.body())) if isinstance(exc, RequestError) else None


def _event(data: dict[str, Any]) -> bytes:
    return b"event: " + data["type"].encode() + b"\ndata: " + _json(data) + b"\n\n"


class _Run:
    """One admitted Responses request: its translation, output and what its body echoes."""

    def __init__(self, req: ResponsesRequest, chat: Any, r: Admitted) -> None:
        self.req, self.chat, self.r = req, chat, r
        self.id = "resp_" + r.request_id
        self.out = ro.Output()
        self.finish: str | None = None

    def feed(self, shaper: Any, index: int, part: Any, d: Any) -> list[dict[str, Any]]:
        if d.finish_reason:
            self.finish = d.finish_reason
        events: list[dict[str, Any]] = []
        for choice in shaper.chunk(index, part, d):
            lps = (choice.get("logprobs") or {}).get("content")
            events += self.out.feed(choice.get("delta") or {}, lps)
        return events

    def body(self, state: str) -> dict[str, Any]:
        req, sampling = self.req, self.r.dispatch.sampling
        incomplete = None
        usage = None
        if state == "done":
            state, incomplete = ro.status(self.finish)
            post = self.r.parts[0].post
            assert post is not None  # a generation's part always has its post-processor
            tok = self.r.entry.tokenizer
            reasoning = len(tok.encode(self.out.reasoning, False)) if self.out.reasoning and tok else 0
            usage = ro.usage(post.usage, reasoning)
        fmt = (req.text or {}).get("format") or {"type": "text"}
        temperature = sampling.get("temperature")
        top_p = sampling.get("top_p")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.r.created,
            "status": state,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": None,
            "model": self.r.model,
            "output": self.out.items if state != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": self.chat.reasoning_effort, "summary": None},
            "service_tier": "default",
            "store": req.store,
            "temperature": 1.0 if temperature is None else temperature,
            "text": {"format": fmt, "verbosity": "medium"},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_logprobs": req.top_logprobs or 0,
            "top_p": 1.0 if top_p is None else top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
            "background": False,
        }


class ResponsesSurface(Surface):
    description = "OpenAI's Responses API (/v1/responses: create, retrieve, delete)"

    def __init__(self, path: Any, settings: Any) -> None:
        super().__init__(path, settings)
        # The same chat template, tool and reasoning parsers as the OpenAI surface's chat.
        self.chat_fmt: ChatFormatter = chat_formatter(settings.frontend)
        own = settings.plugin(ResponsesSettings)
        self.store = ResponseStore(own.responses_store_size)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/cancel", self.cancel, methods=["POST"]),
        ]

    # ---- stored responses ---------------------------------------------------------------------
    async def retrieve(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        for name in request.query_params:  # include[], stream and starting_after (background runs)
            err = RequestError(400, f"query parameter {name!r} is not supported by this server", param=name)
            return self.error_response(err)
        stored = self.store.get(rid)
        if stored is None:
            return self.error_response(not_found(rid, "response_id"))
        return JSONResponse(stored.body)

    async def delete(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        if self.store.pop(rid) is None:
            return self.error_response(not_found(rid, "response_id"))
        return JSONResponse({"id": rid, "object": "response", "deleted": True})

    async def cancel(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        if self.store.get(rid) is None:
            return self.error_response(not_found(rid, "response_id"))
        # Only background responses can be cancelled, and this server runs none.
        err = RequestError(400, "Cannot cancel a synchronous response.", param="response_id")
        return self.error_response(err)

    # ---- create ----------------------------------------------------------------------------------
    async def create(self, request: Request) -> Reply:
        model = "?"
        try:
            req = parse(await bodies.read(request, self.max_body))
            model = req.model
            history: list[dict[str, Any]] = []
            if req.previous_response_id is not None:
                prev = self.store.get(req.previous_response_id)
                if prev is None:
                    raise not_found(req.previous_response_id, "previous_response_id")
                history = prev.conversation
            chat = to_chat(req, history)
            messages = chat.messages
            r = await self.path.admit(
                "responses",
                chat,
                lambda entry: self.chat_fmt.prompts(entry, chat),
                lambda: [u for m in messages for u in m.image_urls()],
                request.headers,
            )
        except RequestError as exc:
            if exc.param == "max_tokens":  # the shared budget check names chat's field
                exc.param = "max_output_tokens"
            self.path.refused(model, exc)
            return self.error_response(exc)
        run = _Run(req, chat, r)
        shaper = self.chat_fmt.shaper(chat, r.parts, 1)
        if req.stream:
            return EventStream(self._stream(run, shaper), r.headers, _early_error)

        async def consume() -> None:
            async for index, part, d in r.deltas():
                run.feed(shaper, index, part, d)

        failed = await self.path.complete(r, consume)
        if failed is not None:
            return self.error_response(failed)
        run.out.finish()
        return JSONResponse(self._done(run), headers=r.headers())

    def _done(self, run: _Run) -> dict[str, Any]:
        """The finished response's body, stored when asked for."""
        body = run.body("done")
        if run.req.store:
            # The next turn's history: this turn's input and output; instructions do not carry over.
            start = 1 if run.req.instructions else 0
            conversation = [m.model_dump(exclude_none=True) for m in run.chat.messages[start:]]
            conversation += output_messages(run.out.items)
            self.store.put(run.id, Stored(body, conversation))
        return body

    async def _stream(self, run: _Run, shaper: Any) -> AsyncIterator[bytes]:
        """Responses events: response.created and response.in_progress, the items' events, then
        response.completed (or response.incomplete when max_output_tokens cut the answer)."""
        r, out = run.r, run.out
        self.path.begin(r)
        status = "200"
        opening = run.body("in_progress")
        events = [
            out.event("response.created", response=opening),
            out.event("response.in_progress", response=opening),
        ]
        buf: list[bytes] = [_event(e) for e in events]
        sent = False
        try:
            async for index, part, d in r.deltas():
                buf += [_event(e) for e in run.feed(shaper, index, part, d)]
                if buf and not d.finish_reason and r.flush_due():
                    sent = True
                    yield b"".join(buf)
                    buf.clear()
            buf += [_event(e) for e in out.finish()]
            body = self._done(run)
            kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
            buf.append(_event(out.event(kind, response=body)))
        except RemoteError as exc:
            err = from_remote(exc)
            status = str(err.status)
            if not sent:
                raise err from None
            buf.append(_event(out.event("error", code=err.code, message=err.message, param=err.param)))
        except BaseException:
            status = "499"
            raise
        finally:
            self.path.end(r, status)
        yield Last(b"".join(buf))
