"""OpenAI's Responses API (`/v1/responses`) over the shared request path.

A Responses request is translated into the chat request it means (`responses_schema`), so prompts
come from the same chat template and output goes through the same tool and reasoning parsers as
chat completions; what comes back is shaped as output items and Responses events
(`responses_output`) straight from the parsed output, without chat's chunks in between. Responses
created with `store: true` (the default, as at OpenAI) are kept in this frontend process's memory
and, where the frontend has NATS, in the namespace's shared store, bounded by
--responses-store-size (`responses_stored`): GET and DELETE /v1/responses/{id} read and drop
them from any frontend process, and `previous_response_id` continues their conversation.

`background: true` (with `store: true`) answers at once with a `queued` response and runs it in
a task: GET polls it (`in_progress`, then `completed`, `incomplete`, `failed`), POST
/v1/responses/{id}/cancel cancels it (the worker's request is aborted). With `stream: true` as
well, its events are kept with it: the creating request streams them, and GET ?stream=true
(&starting_after=N) reads them again from any point.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError, from_remote
from dynvllm.frontend.event_stream import EventStream, Last, Reply
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.openai.formatters import ChatFormatter, chat_logprobs
from dynvllm.frontend.openai.surface import chat_formatter
from dynvllm.frontend.request_path import Admitted
from dynvllm.frontend.surface import Surface
from dynvllm.runtime.errors import RemoteError
from dynvllm_plugins.surfaces import responses_output as ro
from dynvllm_plugins.surfaces.responses_schema import ResponsesRequest, output_messages, parse, to_chat
from dynvllm_plugins.surfaces.responses_settings import ResponsesSettings
from dynvllm_plugins.surfaces.responses_store import EventLog, ResponseStore, Stored
from dynvllm_plugins.surfaces.responses_stored import Kept

__all__ = ["ResponseStore", "ResponsesSurface", "Stored"]

_json = msgspec.json.Encoder().encode
logger = logging.getLogger("dynvllm.frontend")


def _answer(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(_json(body), media_type="application/json", headers=headers)


def _early_error(exc: Exception) -> tuple[int, bytes] | None:
    """A streamed request that failed before its first event: its status and JSON error."""
    return (exc.status, _json(exc.body())) if isinstance(exc, RequestError) else None


def _body_event(out: ro.Output, kind: str, body: bytes) -> bytes:
    """`ro.sse(out.event(kind, response=...))` for a body already encoded: the same bytes, without
    encoding the whole response again for each event that carries it."""
    seq, out.seq = out.seq, out.seq + 1
    head = kind.encode()
    return b'event: %s\ndata: {"type":"%s","sequence_number":%d,"response":%s}\n\n' % (head, head, seq, body)


class _Run:
    """One Responses request: its translation, output and what its body echoes."""

    def __init__(self, req: ResponsesRequest, chat: Any, entry: ModelEntry, rid: str, created: int) -> None:
        self.req, self.chat, self.id, self.created = req, chat, rid, created
        self.tokenizer = entry.tokenizer
        # As the request's sampling options take them: the model's defaults fill what it leaves out.
        defaults = entry.sampling_defaults
        self.temperature = req.temperature if req.temperature is not None else defaults.get("temperature")
        self.top_p = req.top_p if req.top_p is not None else defaults.get("top_p")
        self.out = ro.Output(events=req.stream)
        self.finish: str | None = None
        self.r: Admitted | None = None
        self.error: dict[str, Any] | None = None
        self._pieces: tuple[bytes, bytes, bytes, bytes] | None = None

    def _take(self, shaper: Any, out: Any, d: Any) -> tuple[str, str, Any, Any]:
        """One delta's content, reasoning, tool calls and logprob entries."""
        lps = d.logprobs if shaper.want_logprobs else None
        entries = (chat_logprobs(lps) or {}).get("content") if lps else None
        calls = [(c.id, c.name, c.arguments) for c in out.tool_calls] if out.tool_calls else ()
        return out.content, out.reasoning, calls, entries

    def feed(self, shaper: Any, index: int, part: Any, d: Any) -> None:
        if d.finish_reason:
            self.finish = d.finish_reason
        out = shaper.advance(index, part, d)
        if out.reasoning or out.tool_calls or (d.logprobs and shaper.want_logprobs):
            self.out.step(*self._take(shaper, out, d))
        elif out.content:  # the common case: text alone
            self.out.add_text(out.content)

    def events(self, shaper: Any, index: int, part: Any, d: Any) -> list[bytes]:
        """One delta's events, written for the stream."""
        if d.finish_reason:
            self.finish = d.finish_reason
        out = shaper.advance(index, part, d)
        if out.reasoning or out.tool_calls or (d.logprobs and shaper.want_logprobs):
            return self.out.step_sse(*self._take(shaper, out, d))
        return self.out.step_sse(out.content) if out.content else []

    def usage(self) -> dict[str, Any] | None:
        if self.r is None:
            return None
        post = self.r.parts[0].post
        assert post is not None  # a generation's part always has its post-processor
        tok, reasoning = self.tokenizer, self.out.reasoning
        return ro.usage(post.usage, len(tok.encode(reasoning, False)) if reasoning and tok else 0)

    def _state(self, state: str) -> tuple[str, Any, Any, Any]:
        """A state's status, incomplete_details, output and usage."""
        incomplete = None
        if state == "done":
            state, incomplete = ro.status(self.finish)
        if state in ("queued", "in_progress"):
            return state, incomplete, [], None
        return state, incomplete, self.out.items, self.usage()

    def _fixed(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The body's fields that only the request decides, in the body's order: those between
        incomplete_details and output, between output and usage, and after usage."""
        req = self.req
        fmt = (req.text or {}).get("format") or {"type": "text"}
        return (
            {
                "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens,
                "max_tool_calls": None,
                "model": req.model,
            },
            {
                "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id,
                "reasoning": {"effort": self.chat.reasoning_effort, "summary": None},
                "service_tier": "default",
                "store": req.store,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "text": {"format": fmt, "verbosity": "medium"},
                "tool_choice": req.tool_choice or "auto",
                "tools": req.tools or [],
                "top_logprobs": req.top_logprobs or 0,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "truncation": "disabled",
            },
            {"user": req.user, "metadata": req.metadata or {}, "background": bool(req.background)},
        )

    def body(self, state: str) -> dict[str, Any]:
        """The response body in a state: queued, in_progress, done (completed or incomplete),
        failed or cancelled."""
        status, incomplete, output, usage = self._state(state)
        head, middle, tail = self._fixed()
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": self.error,
            "incomplete_details": incomplete,
            **head,
            "output": output,
            **middle,
            "usage": usage,
            **tail,
        }

    def encoded(self, state: str) -> bytes:
        """`_json(self.body(state))`, with the fields only the request decides encoded once per
        response (a stream sends its body twice; those are most of it)."""
        if self._pieces is None:
            head, middle, tail = (_json(part) for part in self._fixed())
            self._pieces = (
                b'{"id":%s,"object":"response","created_at":%d,"status":' % (_json(self.id), self.created),
                b"," + head[1:-1] + b',"output":',
                b"," + middle[1:-1] + b',"usage":',
                b"," + tail[1:],
            )
        status, incomplete, output, usage = self._state(state)
        start, after_status, after_output, after_usage = self._pieces
        return b"".join(
            (
                start,
                _json(status),
                b',"error":',
                _json(self.error),
                b',"incomplete_details":',
                _json(incomplete),
                after_status,
                _json(output),
                after_output,
                _json(usage),
                after_usage,
            )
        )

    def conversation(self) -> Callable[[], list[dict[str, Any]]]:
        """What makes the next turn's history when asked: this turn's input and output
        (instructions do not carry over). It holds those alone, not the request's state."""
        messages = self.chat.messages[1:] if self.req.instructions else self.chat.messages
        items = self.out.items
        return lambda: [m.model_dump(exclude_none=True) for m in messages] + output_messages(items)


class ResponsesSurface(Surface):
    description = "OpenAI's Responses API (/v1/responses: create, background, retrieve, cancel, delete)"

    def __init__(self, path: Any, settings: Any) -> None:
        super().__init__(path, settings)
        # The same chat template, tool and reasoning parsers as the OpenAI surface's chat.
        self.chat_fmt: ChatFormatter = chat_formatter(settings.frontend)
        own = settings.plugin(ResponsesSettings)
        self.kept = Kept(own.responses_store_size)
        self.share = own.responses_share

    async def start(self, nc: Any, namespace: str) -> None:
        if self.share:
            await self.kept.attach(nc, namespace)

    async def stop(self) -> None:
        await self.kept.detach()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/cancel", self.cancel, methods=["POST"]),
        ]

    # ---- stored responses ---------------------------------------------------------------------
    async def retrieve(self, request: Request) -> Reply:
        rid = request.path_params["response_id"]
        query = request.query_params
        try:
            for name in query:  # include[] and include_obfuscation
                if name not in ("stream", "starting_after"):
                    raise RequestError(
                        400, f"query parameter {name!r} is not supported by this server", param=name
                    )
            stream = query.get("stream", "false").lower()
            if stream not in ("true", "false"):
                raise RequestError(400, "stream must be true or false", param="stream")
            after = query.get("starting_after")
            if after is not None and (stream != "true" or not after.lstrip("-").isdigit()):
                raise RequestError(
                    400, "starting_after is a sequence number, with stream=true", param="starting_after"
                )
            if stream == "true":
                return EventStream(await self.kept.events(rid, int(after) if after is not None else -1))
            body = await self.kept.body(rid)
        except RequestError as exc:
            return self.error_response(exc)
        return Response(body, media_type="application/json")

    async def delete(self, request: Request) -> Response:
        status, body = await self.kept.delete(request.path_params["response_id"])
        return Response(body, status_code=status, media_type="application/json")

    async def cancel(self, request: Request) -> Response:
        status, body = await self.kept.cancel(request.path_params["response_id"])
        return Response(body, status_code=status, media_type="application/json")

    # ---- create ----------------------------------------------------------------------------------
    async def create(self, request: Request) -> Reply:
        model = "?"
        try:
            req = parse(await bodies.read(request, self.max_body))
            model = req.model
            history: list[dict[str, Any]] = []
            if req.previous_response_id is not None:
                history = await self.kept.conversation(req.previous_response_id)
            chat = to_chat(req, history)
            messages = chat.messages
            images = lambda: [u for m in messages for u in m.image_urls()]  # noqa: E731
            if req.background:
                return await self._start_background(req, chat, images, request.headers)
            r = await self.path.admit(
                "responses", chat, lambda entry: self.chat_fmt.prompts(entry, chat), images, request.headers
            )
        except RequestError as exc:
            if exc.param == "max_tokens":  # the shared budget check names chat's field
                exc.param = "max_output_tokens"
            self.path.refused(model, exc)
            return self.error_response(exc)
        run = _Run(req, chat, r.entry, "resp_" + r.request_id, r.created)
        run.r = r
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
        body = run.encoded("done")
        if req.store:
            await self.kept.keep(run.id, Stored(body, run.conversation()), ro.status(run.finish)[0])
        return Response(body, media_type="application/json", headers=r.headers())

    async def _stream(self, run: _Run, shaper: Any) -> AsyncIterator[bytes]:
        """Responses events: response.created and response.in_progress, the items' events, then
        response.completed (or response.incomplete when max_output_tokens cut the answer)."""
        r, out = run.r, run.out
        assert r is not None
        self.path.begin(r)
        status = "200"
        opening = run.encoded("in_progress")
        buf = [
            _body_event(out, "response.created", opening),
            _body_event(out, "response.in_progress", opening),
        ]
        sent = False
        try:
            async for index, part, d in r.deltas():
                buf += run.events(shaper, index, part, d)
                if buf and not d.finish_reason and r.flush_due():
                    sent = True
                    yield b"".join(buf)
                    buf.clear()
            buf += out.finish_sse()
            encoded = run.encoded("done")
            if run.req.store:
                await self.kept.keep(run.id, Stored(encoded, run.conversation()), ro.status(run.finish)[0])
            incomplete = ro.status(run.finish)[0] == "incomplete"
            kind = "response.incomplete" if incomplete else "response.completed"
            buf.append(_body_event(out, kind, encoded))
        except RemoteError as exc:
            err = from_remote(exc)
            status = str(err.status)
            if not sent:
                raise err from None
            buf.append(ro.sse(out.event("error", code=err.code, message=err.message, param=err.param)))
        except BaseException:
            status = "499"
            raise
        finally:
            self.path.end(r, status)
        yield Last(b"".join(buf))

    # ---- background ------------------------------------------------------------------------
    async def _start_background(
        self, req: ResponsesRequest, chat: Any, images: Callable[[], list[str]], headers: Any
    ) -> Reply:
        """Check what can be checked now (model, prompt, budget: the same errors as a request
        answered at once), store the response as queued and run it in a task."""
        entry = await self.path.entry(req.model)
        prompts = self.chat_fmt.prompts(entry, chat)
        for ids, _ in prompts:
            self.path.check_tokens(entry, ids)
            self.path.budget(entry, len(ids), chat.wanted_max_tokens())
        run = _Run(req, chat, entry, "resp_" + os.urandom(16).hex(), int(time.time()))
        stored = Stored(run.body("queued"), run.conversation())
        if req.stream:
            stored.log = EventLog()
            opening = [
                run.out.event(kind, response=stored.body) for kind in ("response.created", "response.queued")
            ]
            stored.log.add([ro.sse(e) for e in opening])
        stored.task = asyncio.create_task(self._background(run, stored, lambda _: prompts, images, headers))
        # The answer says queued, as written: the run may be further once the record is shared.
        reply = EventStream(stored.log.follow(-1)) if stored.log is not None else _answer(stored.body)
        await self.kept.keep(run.id, stored, "queued")
        return reply

    async def _background(
        self,
        run: _Run,
        stored: Stored,
        prompts: Callable[[ModelEntry], list[tuple[list[int], str | None]]],
        images: Callable[[], list[str]],
        headers: Any,
    ) -> None:
        """Run a background response to its end; its stored body follows (in_progress once
        admitted, then completed, incomplete, failed, or cancelled when its task is), and its
        shared record with it, written before a stream's last event."""
        log = stored.log
        try:
            try:
                r = await self.path.admit("responses", run.chat, prompts, images, headers)
            except RequestError as exc:
                self.path.refused(run.req.model, exc)
                await self._failed(run, stored, exc)
                return
            run.r = r
            shaper = self.chat_fmt.shaper(run.chat, r.parts, 1)
            stored.body = run.body("in_progress")
            if log is not None:
                log.add([ro.sse(run.out.event("response.in_progress", response=stored.body))])
            await self.kept.share(run.id, stored)

            async def consume() -> None:
                async for index, part, d in r.deltas():
                    if log is None:
                        run.feed(shaper, index, part, d)
                    elif events := run.events(shaper, index, part, d):
                        log.add(events)

            failed = await self.path.complete(r, consume)
            if failed is not None:
                await self._failed(run, stored, failed)
                return
            events: list[bytes] = []
            if log is None:
                run.out.finish()
            else:
                events = run.out.finish_sse()
            stored.body = run.body("done")
            await self.kept.share(run.id, stored)
            if log is not None:
                kind = (
                    "response.incomplete" if stored.body["status"] == "incomplete" else "response.completed"
                )
                events.append(ro.sse(run.out.event(kind, response=stored.body)))
                log.add(events, end=True)
        except asyncio.CancelledError:
            stored.body = run.body("cancelled")
            await self.kept.share(run.id, stored)
            if log is not None:
                log.add([], end=True)
            raise
        except Exception:
            logger.exception("background response %s failed", run.id)
            err = RequestError(500, "the response failed in the server", "server_error")
            await self._failed(run, stored, err)

    async def _failed(self, run: _Run, stored: Stored, err: RequestError) -> None:
        run.error = {"code": err.code or err.type, "message": err.message}
        stored.body = run.body("failed")
        await self.kept.share(run.id, stored)
        if stored.log is not None:
            stored.log.add([ro.sse(run.out.event("response.failed", response=stored.body))], end=True)
