"""A server-sent-events response that costs one socket write per batch of events.

Starlette's StreamingResponse writes every chunk and then an empty closing chunk, and watches for
the client leaving through an anyio task group. Per request that is a write more and several
tasks more than needed; at hundreds of requests a second those writes are what the frontend's
core spends most on. Here the events marked `Last` leave with the end of the body in one write,
and one plain task watches for a disconnect, cancelling the stream (and so the worker's request)
when the client goes. Every other batch of events is written as soon as it comes: an earlier
version held each batch back until the next one came, to find the last without a mark, which
delayed every token by a batch (on a GPU under load, the first text by hundreds of ms).

The status line waits for the first events: by then the response headers can say where the
request went, and a request that fails before streaming anything gets its real status and a JSON
error (`early_error`), as a non-streaming one would, rather than a 200 with an error event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import Response

Scope = dict[str, Any]


class Last(bytes):
    """The stream's final events: written with the end of the body."""


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class EventStream:
    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Callable[[], Mapping[str, str]] | None = None,
        early_error: Callable[[Exception], tuple[int, bytes] | None] | None = None,
    ) -> None:
        self.events = events
        self.headers = headers
        self.early_error = early_error

    def _start(self) -> dict:
        raw = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        if self.headers is not None:
            raw += _raw(self.headers())
        return {"type": "http.response.start", "status": 200, "headers": raw}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        ended = False
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not ended:  # the server reports a disconnect after the body ends, too
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        events = self.events.__aiter__()
        try:
            try:
                held: bytes | None = await events.__anext__()
            except StopAsyncIteration:
                held = None
            except Exception as exc:
                answer = self.early_error(exc) if self.early_error is not None else None
                if answer is None:
                    raise
                ended = True
                status, body = answer
                json_type = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": status, "headers": json_type})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(self._start())
            while held is not None and not isinstance(held, Last):
                await send({"type": "http.response.body", "body": held, "more_body": True})
                held = await anext(events, None)
            ended = True
            await send({"type": "http.response.body", "body": held or b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # our own cancellation: the client left, and nothing is left to send
        finally:
            watcher.cancel()


#: What a route that may stream returns: Starlette runs either as an ASGI app.
Reply = Response | EventStream
